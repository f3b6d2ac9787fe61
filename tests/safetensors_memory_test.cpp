// tests/safetensors_memory_test.cpp - what opening a safetensors file allocates: at most
// detail::header_memory_factor (5) times the file's size plus header_memory_slack (1 MiB), for
// headers built to cost the most per byte, and a format_error, not an allocation, past it.
//
// This executable replaces the global operator new and delete to count the bytes live on the
// heap and their peak (every allocation the reader and nlohmann_json make goes through them);
// so it is its own test program.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <string>

#include "attn/io/safetensors.hpp"
#include "support/temp_files.hpp"
#include "support/test_util.hpp"

namespace {

std::atomic<std::size_t> live{0}, peak{0};
constexpr std::size_t kHeader = 16;  // a block's size sits before it, keeping 16-byte alignment

void* counted_new(std::size_t n) {
  void* block = std::malloc(n + kHeader);
  if (!block) throw std::bad_alloc();
  std::memcpy(block, &n, sizeof n);
  const std::size_t now = live.fetch_add(n) + n;
  for (std::size_t p = peak.load(); now > p && !peak.compare_exchange_weak(p, now);) {
  }
  return static_cast<char*>(block) + kHeader;
}
void counted_delete(void* p) noexcept {
  if (!p) return;
  char* block = static_cast<char*>(p) - kHeader;
  std::size_t n = 0;
  std::memcpy(&n, block, sizeof n);
  live.fetch_sub(n);
  std::free(block);
}

}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { counted_delete(p); }
void operator delete[](void* p) noexcept { counted_delete(p); }
void operator delete(void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_delete(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_delete(p); }

namespace {

namespace fs = std::filesystem;
using attn::io::FileAccess;
using attn::io::SafeTensors;

class SafeTensorsMemoryTest : public attn_test::TempDirTest {
 protected:
  // The most bytes live at once while `open` runs, above those live before it.
  template <class Open>
  static std::size_t peak_of(Open open) {
    const std::size_t before = live.load();
    peak.store(before);
    open();
    return peak.load() - before;
  }
  static std::size_t bound(std::size_t file_size) {
    return attn::io::detail::header_memory_factor * file_size + attn::io::detail::header_memory_slack;
  }
  // Writes the file, opens it mapped (no copy of the file on the heap) and read (one copy more),
  // and checks each peak against the bound; returns the mapped peak.
  std::size_t expect_within_bound(const std::string& bytes, std::size_t tensors) {
    const fs::path p = write_raw(bytes);
    const std::size_t mapped = peak_of([&] { EXPECT_EQ(SafeTensors::open(p).names().size(), tensors); });
    EXPECT_LE(mapped, bound(bytes.size())) << "of a file of " << bytes.size() << " bytes";
    const std::size_t read =
        peak_of([&] { EXPECT_EQ(SafeTensors::open(p, FileAccess::Read).names().size(), tensors); });
    EXPECT_LE(read, bound(bytes.size()) + bytes.size() + 8);
    return mapped;
  }
};

// The control: the counter sees an allocation, so the bounds below cannot pass by counting nothing.
TEST_F(SafeTensorsMemoryTest, CountsAllocations) {
  const std::size_t n = peak_of([] {
    auto* big = new char[3'000'000];
    big[0] = 1;
    delete[] big;
  });
  EXPECT_GE(n, 3'000'000u);
}

// The issue's file: 1.5 million empty tensors, a legal 89 MB header, took 1.56 GB (17.5 times
// its size) and 20 s. Now 1.74 times (the names, their entries, the index; no JSON document).
// Under the sanitizers a tenth of it, for time.
TEST_F(SafeTensorsMemoryTest, ManyEmptyTensorsStayWithinTheBound) {
  const int n = attn_test::kSanitized ? 150'000 : 1'500'000;
  std::string h = "{";
  h.reserve(static_cast<std::size_t>(n) * 60);
  for (int i = 0; i < n; ++i)
    h += (i ? ",\"t" : "\"t") + std::to_string(i) + R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
  h += "}";
  const std::string file = frame(h, "");
  h = std::string();
  const std::size_t used = expect_within_bound(file, static_cast<std::size_t>(n));
  std::printf("%d empty tensors: a file of %zu bytes, a peak of %zu bytes on the heap (%.2f times)\n", n, file.size(),
              used, static_cast<double>(used) / static_cast<double>(file.size()));
  EXPECT_LT(used, 3 * file.size()) << "the reader's own cost per tensor grew";
}

// Other headers that cost the most per byte: long shapes (8 bytes per "1," of text, and the
// longest one's room besides), many keys of metadata, long names, a tensor entry with large
// ignored fields.
TEST_F(SafeTensorsMemoryTest, CostlyHeadersStayWithinTheBound) {
  std::string dims = "0";
  for (int i = 0; i < 40'000; ++i) dims += ",1";
  std::string shapes = "{";
  for (int i = 0; i < 20; ++i)
    shapes +=
        (i ? ",\"" : "\"") + std::to_string(i) + R"(":{"dtype":"F32","shape":[)" + dims + R"(],"data_offsets":[0,0]})";
  expect_within_bound(frame(shapes + "}", ""), 20);

  std::string meta = R"({"__metadata__":{)";
  for (int i = 0; i < 10'000; ++i)
    meta += (i ? ",\"" : "\"") + std::to_string(i) + "\":\"" + std::string(100, 'v') + "\"";
  expect_within_bound(frame(meta + "}}", ""), 0);

  std::string names = "{";
  for (int i = 0; i < 2'000; ++i)
    names += (i ? ",\"" : "\"") + std::string(1000, 'n') + std::to_string(i) +
             R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
  expect_within_bound(frame(names + "}", ""), 2000);

  std::string note = "[";
  for (int i = 0; i < 300'000; ++i) note += i ? ",{}" : "{}";
  expect_within_bound(frame(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"note":)" + note + "]}}", ""), 1);
}

// A header whose reading would pass the bound is refused before the allocation, with a clear
// message, and the peak stays within the bound: one metadata string of 8 MiB, the whole file
// (nlohmann's two token buffers take up to 5 times its length, the copy once more), one shape of
// 400,001 dimensions (8 bytes for each 2 of text, twice: the room for it and the copy), and
// 100,000 metadata keys with empty values (a std::map node, 112 bytes, for each 11 of text).
TEST_F(SafeTensorsMemoryTest, RefusesAHeaderThatWouldPassTheBound) {
  std::string dims = "0";
  for (int i = 0; i < 400'000; ++i) dims += ",1";
  for (const std::string& header : {R"({"__metadata__":{"k":")" + std::string(8 << 20, 'v') + "\"}}",
                                    R"({"x":{"dtype":"F32","shape":[)" + dims + R"(],"data_offsets":[0,0]}})"}) {
    const std::string file = frame(header, "");
    const fs::path p = write_raw(file);
    const std::size_t used = peak_of([&] {
      try {
        (void)SafeTensors::open(p);
        ADD_FAILURE() << "no format_error";
      } catch (const attn::format_error& e) {
        const std::string what = e.what();
        EXPECT_NE(
            what.find("reading its header would allocate more than " + std::to_string(bound(file.size())) + " bytes"),
            std::string::npos)
            << what;
        EXPECT_NE(what.find("5 times the file's size plus 1048576 bytes"), std::string::npos) << what;
      }
    });
    EXPECT_LE(used, bound(file.size()));
  }
  // A string of 128 KiB opens: the slack is for small files.
  const std::string small = frame(R"({"__metadata__":{"k":")" + std::string(1 << 17, 'v') + "\"}}", "");
  EXPECT_EQ(SafeTensors::open(write_raw(small, "small.safetensors")).metadata().at("k").size(), std::size_t(1) << 17);
}

}  // namespace
