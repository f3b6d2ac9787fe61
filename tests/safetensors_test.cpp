// tests/safetensors_test.cpp - attn/io/safetensors.hpp: reading (mapped and converted), writing,
// and a format_error for every malformed file, each crafted byte by byte here.
//
// Built twice: safetensors_test memory-maps files, safetensors_no_mmap_test (ATTN_IO_NO_MMAP) reads
// them into memory as the non-POSIX fallback does.
#include "attn/io/safetensors.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "support/temp_files.hpp"
#include "support/test_util.hpp"

namespace {

namespace fs = std::filesystem;
using attn::Index;
using attn::io::DType;
using attn::io::FileAccess;
using attn::io::SafeTensors;
using attn::io::StateDict;
using attn::io::Tensor;

constexpr double inf = std::numeric_limits<double>::infinity();

::testing::AssertionResult mentions(const std::string& msg, const std::string& needle) {
  if (msg.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << msg << "\" does not mention \"" << needle << "\"";
}

class SafeTensorsTest : public attn_test::TempDirTest {
 protected:
  // Opening p must throw attn::format_error naming the file and every needle.
  static void expect_open_error(const fs::path& p, std::initializer_list<std::string> needles) {
    try {
      (void)SafeTensors::open(p);
      ADD_FAILURE() << "no format_error opening " << p;
    } catch (const attn::format_error& e) {
      EXPECT_TRUE(mentions(e.what(), p.string()));
      for (const std::string& n : needles) EXPECT_TRUE(mentions(e.what(), n));
    }
  }
  // One tensor "x" with this entry body (dtype, shape, offsets), and data.
  fs::path one(const std::string& entry, const std::string& data) const {
    return write(R"({"x":)" + entry + "}", data);
  }
};

// --- reading -------------------------------------------------------------------------------------

TEST_F(SafeTensorsTest, ReadsF32AndF64WithoutACopy) {
  // a: F32 [2, 3] = [[1, 2, 3], [4, 5, 6]] at [0, 24); b: F64 [3] = [0.5, -1, 1e300] at [24, 48);
  // the header is padded with spaces to a multiple of 8 bytes, so the data starts 8-byte aligned.
  const std::string header =
      padded(R"({"b":{"dtype":"F64","shape":[3],"data_offsets":[24,48]},)"
             R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"__metadata__":{"format":"pt"}})");
  const fs::path p = write(header, floats({1, 2, 3, 4, 5, 6}) + doubles({0.5, -1, 1e300}));
  const SafeTensors st = SafeTensors::open(p);

  EXPECT_EQ(st.path(), p.string());
  EXPECT_EQ(st.names(), (std::vector<std::string>{"b", "a"}));  // the header's order
  EXPECT_TRUE(st.contains("a"));
  EXPECT_FALSE(st.contains("__metadata__"));
  EXPECT_EQ(st.metadata(), (attn::io::Metadata{{"format", "pt"}}));
  EXPECT_EQ(st.info("a").dtype, DType::F32);
  EXPECT_EQ(st.info("a").shape, (attn::io::TensorShape{2, 3}));
  EXPECT_EQ(st.info("b").begin, 24u);
  EXPECT_EQ(st.info("b").end, 48u);

  const auto a = st.map<float>("a");
  EXPECT_EQ(static_cast<const void*>(a.data()), static_cast<const void*>(st.bytes("a")));  // a view of the file
  EXPECT_EQ(a.rows(), 2);
  EXPECT_EQ(a.cols(), 3);
  EXPECT_EQ(a(1, 0), 4.0f);  // row-major
  const auto b = st.map<double>("b");
  EXPECT_EQ(b.rows(), 1);  // 1-D: one row
  EXPECT_EQ(b.cols(), 3);
  EXPECT_EQ(b(0, 2), 1e300);

  // Converted copies, as static_cast converts.
  EXPECT_EQ(st.matrix<double>("a")(1, 2), 6.0);
  EXPECT_EQ(st.matrix<float>("b")(0, 0), 0.5f);
  EXPECT_EQ(st.matrix<float>("b")(0, 2), std::numeric_limits<float>::infinity());
  const attn::Vector<double> bv = st.vector<double>("b");
  EXPECT_EQ(bv.size(), 3);
  EXPECT_EQ(bv(1), -1.0);
  EXPECT_EQ(st.matrix<float>("a"), a);
}

TEST_F(SafeTensorsTest, ReadsEveryShapeAsAMatrix) {
  // s: scalar [] -> [1, 1]; t: [2, 3, 2] -> [2, 6]; e: [0, 3] -> [0, 3]; z: [0] -> [1, 0];
  // y: [3, 0, 5] -> [3, 0]; k: [1, 1, 4] (bias_k's shape) -> [1, 4] and a vector of 4.
  const std::string header = R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},)"
                             R"("t":{"dtype":"F64","shape":[2,3,2],"data_offsets":[8,104]},)"
                             R"("e":{"dtype":"F64","shape":[0,3],"data_offsets":[104,104]},)"
                             R"("z":{"dtype":"F32","shape":[0],"data_offsets":[104,104]},)"
                             R"("y":{"dtype":"F64","shape":[3,0,5],"data_offsets":[0,0]},)"
                             R"("k":{"dtype":"F64","shape":[1,1,4],"data_offsets":[104,136]}})";
  std::string t;
  for (int i = 0; i < 12; ++i) t += doubles({double(i)});
  const SafeTensors st = SafeTensors::open(write(padded(header), doubles({7.5}) + t + doubles({1, 2, 3, 4})));

  const attn::Matrix<double> s = st.matrix<double>("s");
  EXPECT_EQ(s.rows(), 1);
  EXPECT_EQ(s.cols(), 1);
  EXPECT_EQ(s(0, 0), 7.5);
  EXPECT_EQ(st.vector<double>("s").size(), 1);

  const auto tm = st.map<double>("t");
  ASSERT_EQ(tm.rows(), 2);
  ASSERT_EQ(tm.cols(), 6);
  EXPECT_EQ(tm(1, 4), 10.0);                                       // element [1, 2, 0] = 1*6 + 2*2 + 0
  EXPECT_THROW((void)st.vector<double>("t"), attn::format_error);  // two dimensions other than 1

  for (const char* name : {"e", "z", "y"}) {
    SCOPED_TRACE(name);
    EXPECT_EQ(st.info(name).numel(), 0);
    EXPECT_EQ(st.matrix<double>(name).size(), 0);
    EXPECT_EQ(st.tensor<double>(name).numel(), 0);
  }
  EXPECT_EQ(st.matrix<double>("e").rows(), 0);
  EXPECT_EQ(st.matrix<double>("e").cols(), 3);
  EXPECT_EQ(st.matrix<float>("z").rows(), 1);
  EXPECT_EQ(st.matrix<float>("z").cols(), 0);
  EXPECT_EQ(st.map<double>("y").rows(), 3);
  EXPECT_EQ(st.map<double>("y").cols(), 0);

  EXPECT_EQ(st.matrix<double>("k").rows(), 1);
  EXPECT_EQ(st.matrix<double>("k").cols(), 4);
  EXPECT_EQ(st.vector<float>("k"), attn_test::vec<float>({1, 2, 3, 4}));
}

TEST_F(SafeTensorsTest, ConvertsHalfBfloatAndFloat8ByHand) {
  // F16 (1 sign, 5 exponent bias 15, 10 mantissa): 0x3C00 = 1; 0xC000 = -2; 0x7BFF = (1024 + 1023)
  // * 2^(30 - 25) = 65504; 0x0001 = 2^-24 (smallest subnormal); 0x0400 = 2^-14; 0x3555 = (1024 +
  // 341) * 2^(13 - 25) = 1365 / 4096; 0x8000 = -0; 0x7C00 = inf; 0xFC00 = -inf; 0x7E00 = NaN.
  // BF16 (the top half of a float): 0x3F80 = 1; 0xC020 = -2.5; 0x4049 = 0x40490000 = 3.140625;
  // 0x0001 = 2^-149 * 2^16 = 2^-133; 0x7F80 = inf; 0x7FC0 = NaN.
  // F8_E5M2 (the top byte of a half): 0x3C = 1; 0x7B = 0x7B00 = (1024 + 768) * 2^5 = 57344;
  // 0x01 = 0x0100 = 2^-16; 0xFC = -inf.
  // F8_E4M3 (fn: bias 7, 3 mantissa bits, no inf): 0x38 = (8 + 0) * 2^(7 - 10) = 1; 0x7E = (8 + 6) *
  // 2^(15 - 10) = 448; 0x01 = 1 * 2^-9; 0xB8 = -1; 0x7F = 0xFF = NaN; 0x80 = -0.
  const std::string header = R"({"h":{"dtype":"F16","shape":[10],"data_offsets":[0,20]},)"
                             R"("b":{"dtype":"BF16","shape":[6],"data_offsets":[20,32]},)"
                             R"("e5":{"dtype":"F8_E5M2","shape":[4],"data_offsets":[32,36]},)"
                             R"("e4":{"dtype":"F8_E4M3","shape":[7],"data_offsets":[36,43]}})";
  const std::string data =
      le<std::uint16_t>({0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0400, 0x3555, 0x8000, 0x7C00, 0xFC00, 0x7E00}) +
      le<std::uint16_t>({0x3F80, 0xC020, 0x4049, 0x0001, 0x7F80, 0x7FC0}) + le<std::uint8_t>({0x3C, 0x7B, 0x01, 0xFC}) +
      le<std::uint8_t>({0x38, 0x7E, 0x01, 0xB8, 0x7F, 0xFF, 0x80});
  const SafeTensors st = SafeTensors::open(write(header, data));

  const attn::Matrix<double> h = st.matrix<double>("h");
  const double want_h[] = {1, -2, 65504, std::ldexp(1.0, -24), std::ldexp(1.0, -14), 1365.0 / 4096, -0.0, inf, -inf};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(h(0, i), want_h[i]) << "F16 element " << i;
  EXPECT_TRUE(std::signbit(h(0, 6)));
  EXPECT_TRUE(std::isnan(h(0, 9)));
  EXPECT_EQ(st.matrix<float>("h")(0, 3), std::ldexp(1.0f, -24));

  const attn::Matrix<float> b = st.matrix<float>("b");
  const float want_b[] = {1, -2.5f, 3.140625f, std::ldexp(1.0f, -133), std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(b(0, i), want_b[i]) << "BF16 element " << i;
  EXPECT_TRUE(std::isnan(b(0, 5)));

  const attn::Matrix<double> e5 = st.matrix<double>("e5");
  EXPECT_EQ(e5, (attn_test::mat<double>({{1, 57344, std::ldexp(1.0, -16), -inf}})));

  const attn::Matrix<double> e4 = st.matrix<double>("e4");
  EXPECT_EQ(e4(0, 0), 1.0);
  EXPECT_EQ(e4(0, 1), 448.0);
  EXPECT_EQ(e4(0, 2), std::ldexp(1.0, -9));
  EXPECT_EQ(e4(0, 3), -1.0);
  EXPECT_TRUE(std::isnan(e4(0, 4)));
  EXPECT_TRUE(std::isnan(e4(0, 5)));
  EXPECT_EQ(e4(0, 6), 0.0);
  EXPECT_TRUE(std::signbit(e4(0, 6)));
}

// Every one of the 65536 F16 and BF16 bit patterns against Eigen's own half and bfloat16.
TEST_F(SafeTensorsTest, HalfAndBfloatMatchEigenOnEveryBitPattern) {
  std::string bits;
  for (std::uint32_t i = 0; i < 65536; ++i) bits += le<std::uint16_t>({static_cast<std::uint16_t>(i)});
  const std::string header = R"({"h":{"dtype":"F16","shape":[256,256],"data_offsets":[0,131072]},)"
                             R"("b":{"dtype":"BF16","shape":[65536],"data_offsets":[131072,262144]}})";
  const SafeTensors st = SafeTensors::open(write(header, bits + bits));
  const attn::Matrix<float> h = st.matrix<float>("h"), b = st.matrix<float>("b");
  int bad = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto u = static_cast<std::uint16_t>(i);
    const float want_h = static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(u)));
    const float want_b = static_cast<float>(Eigen::bfloat16(Eigen::bfloat16_impl::raw_uint16_to_bfloat16(u)));
    const float got_h = h.data()[i], got_b = b.data()[i];
    const bool ok_h = std::isnan(want_h) ? std::isnan(got_h) : std::memcmp(&got_h, &want_h, 4) == 0;
    const bool ok_b = std::isnan(want_b) ? std::isnan(got_b) : std::memcmp(&got_b, &want_b, 4) == 0;
    if ((!ok_h || !ok_b) && ++bad <= 5)
      ADD_FAILURE() << "bits 0x" << std::hex << i << std::dec << ": F16 " << got_h << " (Eigen " << want_h << "), BF16 "
                    << got_b << " (Eigen " << want_b << ")";
  }
  EXPECT_EQ(bad, 0);
}

TEST_F(SafeTensorsTest, MapRefusesAnotherDtypeAndMisalignedData) {
  const std::string aligned = padded(
      R"({"f":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}})");
  const SafeTensors st = SafeTensors::open(write(aligned, floats({1, 2}) + le<std::uint16_t>({0x3C00, 0x4000})));
  try {
    (void)st.map<double>("f");
    ADD_FAILURE() << "map<double> of F32";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "tensor \"f\" is not F64"));
    EXPECT_TRUE(mentions(e.what(), "matrix<double>() converts it"));
  }
  EXPECT_THROW((void)st.map<float>("h"), attn::format_error);
  EXPECT_EQ(st.map<float>("f")(0, 1), 2.0f);
  EXPECT_FALSE(st.tensor<double>("f").is_view());  // converted
  EXPECT_EQ(st.tensor<double>("f").matrix()(0, 1), 2.0);

  // A header of 76 bytes puts the data at byte 84: 4-byte aligned, not 8.
  std::string header = R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})";
  header.append(76 - header.size(), ' ');
  const SafeTensors odd = SafeTensors::open(write(header, doubles({2.5}), "odd.safetensors"));
  try {
    (void)odd.map<double>("d");
    ADD_FAILURE() << "map<double> of misaligned data";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "tensor \"d\" is not aligned"));
  }
  EXPECT_EQ(odd.matrix<double>("d")(0, 0), 2.5);  // the copy does not care
  EXPECT_FALSE(odd.tensor<double>("d").is_view());
}

TEST_F(SafeTensorsTest, TensorsKeepTheFileMapped) {
  const fs::path p =
      write(padded(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})"), floats({1, 2, 3, 4}));
  Tensor<float> t;
  StateDict<float> sd;
  {
    const SafeTensors st = SafeTensors::open(p);
    t = st.tensor<float>("x");
    sd = st.state_dict<float>();
  }  // the SafeTensors is gone; the mapping lives on in t and sd
  EXPECT_TRUE(t.is_view());
  EXPECT_EQ(t.shape(), (attn::io::TensorShape{2, 2}));
  EXPECT_EQ(t.matrix(), (attn_test::mat<float>({{1, 2}, {3, 4}})));
  EXPECT_EQ(sd.names(), std::vector<std::string>{"x"});
  EXPECT_TRUE(sd.at("x").is_view());
  EXPECT_EQ(sd.at("x").vector()(3), 4.0f);
}

TEST_F(SafeTensorsTest, ReadsMasksAndListsDtypesItDoesNotConvert) {
  const SafeTensors st = SafeTensors::open(write(
      R"({"m":{"dtype":"BOOL","shape":[2,2],"data_offsets":[0,4]},"i":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},)"
      R"("bad":{"dtype":"BOOL","shape":[1],"data_offsets":[4,5]}})",
      std::string("\x01\x00\x00\x01\x02\x00\x00\x00", 8) + le<std::int64_t>({42})));
  EXPECT_EQ(st.mask("m"), (attn::BoolMatrix(2, 2) << true, false, false, true).finished());
  EXPECT_EQ(st.info("i").dtype, DType::I64);
  std::int64_t i = 0;
  std::memcpy(&i, st.bytes("i"), sizeof i);
  EXPECT_EQ(i, 42);
  try {
    (void)st.matrix<float>("i");
    ADD_FAILURE() << "matrix<float> of I64";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "tensor \"i\" has dtype I64, not a floating-point type"));
  }
  EXPECT_THROW((void)st.tensor<float>("m"), attn::format_error);
  EXPECT_THROW((void)st.mask("i"), attn::format_error);
  try {
    (void)st.mask("bad");
    ADD_FAILURE() << "a BOOL byte of 2";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "tensor \"bad\" holds byte 2 at element 0; BOOL is 0 or 1"));
  }
  try {
    (void)st.info("nope");
    ADD_FAILURE() << "an absent tensor";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "has no tensor \"nope\" (it has 3 tensors: m, i, bad)"));
  }
}

TEST_F(SafeTensorsTest, AcceptsWhatTheFormatAllows) {
  // No metadata, whitespace and newlines in the header, unknown fields in an entry, a gap between
  // tensors, an empty tensor sharing an offset with another, an empty header.
  const SafeTensors st = SafeTensors::open(
      write("{\n  \"a\": {\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [0, 8], \"note\": [1, {}]},\n"
            "  \"b\": {\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [16, 24]},\n"
            "  \"c\": {\"dtype\": \"F64\", \"shape\": [0], \"data_offsets\": [16, 16]}\n}\n",
            doubles({1, 99, 2})));
  EXPECT_TRUE(st.metadata().empty());
  EXPECT_EQ(st.matrix<double>("b")(0, 0), 2.0);
  EXPECT_EQ(st.names().size(), 3u);
  const SafeTensors empty = SafeTensors::open(write("{}", "", "empty.safetensors"));
  EXPECT_TRUE(empty.names().empty());
  EXPECT_TRUE(SafeTensors::open(write(R"({"__metadata__":{}})", "", "m.safetensors")).metadata().empty());
}

// --- malformed files: a format_error naming the file, the tensor and the problem -----------------

TEST_F(SafeTensorsTest, RejectsAMissingFile) { expect_open_error(path("absent.safetensors"), {"cannot open"}); }

// Anything but a regular file is refused before it is opened for reading: a FIFO with no
// writer would block open() forever (it did, before the check moved ahead of open()).
TEST_F(SafeTensorsTest, RefusesAFifoADirectoryAndADeviceWithoutBlocking) {
  const fs::path fifo = path("pipe.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_open_error(fifo, {"is a FIFO (named pipe), not a regular file"});
  for (const FileAccess access : {FileAccess::Map, FileAccess::Read}) {
    EXPECT_THROW((void)SafeTensors::open(fifo, access), attn::format_error);
    EXPECT_THROW((void)SafeTensors::open(path(""), access), attn::format_error);  // the directory
  }
  expect_open_error(path(""), {"is a directory, not a regular file"});
  expect_open_error("/dev/null", {"is a character device, not a regular file"});
  // A symbolic link to a regular file is one.
  const fs::path target = write(padded(R"({"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})"), doubles({4}));
  fs::create_symlink(target, path("link.safetensors"));
  EXPECT_EQ(SafeTensors::open(path("link.safetensors")).matrix<double>("x")(0, 0), 4.0);
}

// FileAccess::Read holds the file in memory: another process truncating or rewriting it in place
// afterwards changes nothing (mapped, the truncation would be a SIGBUS on the next read, and the
// rewrite would show through map()).
TEST_F(SafeTensorsTest, AFileReadIntoMemoryOutlivesItsTruncation) {
  const std::string header = padded(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})");
  const fs::path p = write(header, floats({1, 2, 3, 4}));
  const SafeTensors st = SafeTensors::open(p, FileAccess::Read);
  EXPECT_FALSE(st.mapped());
  const Eigen::Map<const attn::Matrix<float>> view = st.map<float>("w");  // views the copy
  fs::resize_file(p, 0);
  EXPECT_EQ(st.matrix<float>("w"), (attn::Matrix<float>(2, 2) << 1, 2, 3, 4).finished());
  EXPECT_EQ(view(1, 1), 4.0f);
  {  // rewritten in place: other values at the same offsets
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out << frame(header, floats({9, 9, 9, 9}));
  }
  EXPECT_EQ(view(0, 0), 1.0f);
  EXPECT_EQ(st.tensor<float>("w").matrix()(1, 0), 3.0f);
  // Map is the default where the build maps files.
  EXPECT_EQ(SafeTensors::open(p).mapped(), ATTN_IO_MMAP == 1);
  EXPECT_EQ(SafeTensors::open(p, FileAccess::Map).mapped(), ATTN_IO_MMAP == 1);
  EXPECT_FALSE(SafeTensors::open(p, FileAccess::Read).mapped());
}

TEST_F(SafeTensorsTest, RejectsAFileShorterThanTheLength) {
  expect_open_error(write_raw(""), {"is 0 bytes long, shorter than the 8-byte header length"});
  expect_open_error(write_raw("1234567"), {"is 7 bytes long"});
}

TEST_F(SafeTensorsTest, RejectsAHeaderLengthPastTheEnd) {
  expect_open_error(write_raw(le64(100) + "{}"), {"header length 100 is larger than the file (2 bytes follow"});
  // Absurd lengths are compared with the file, never allocated.
  expect_open_error(write_raw(le64(~std::uint64_t(0)) + "{}"), {"header length 18446744073709551615 is larger"});
  expect_open_error(write_raw(le64(std::uint64_t(1) << 62) + "{}"), {"is larger than the file"});
}

TEST_F(SafeTensorsTest, RejectsAHeaderOverTheLimit) {
  // 100 MB + 1 of header in a sparse file: refused before a byte of it is parsed.
  const std::uint64_t n = 100'000'001;
  const fs::path p = write_raw(le64(n) + "{");
  fs::resize_file(p, 8 + n);
  expect_open_error(p, {"header length 100000001 exceeds the limit of 100000000 bytes"});
}

// The first thing users try: the .pt file torch.save wrote. Named as what it is, with the way out.
TEST_F(SafeTensorsTest, NamesATorchSaveFileAndTheExporter) {
  const std::string export_it = "not safetensors: export it with attn-export (tools/export_state_dict.py)";
  // torch.save(Linear(2, 2).state_dict()) and a legacy-format torch.save (tools/gen_state_dict_fixtures.py).
  const fs::path data = fs::path(ATTN_TEST_DATA_DIR) / "state_dict";
  expect_open_error(data / "torch_save_zip.pt", {"this looks like a torch.save file (a zip archive), " + export_it});
  expect_open_error(data / "torch_save_pickle.pt", {"this looks like a torch.save file (a pickle), " + export_it});
  std::ifstream in(data / "torch_save_zip.pt", std::ios::binary);
  const std::string zip((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    (void)SafeTensors::from_bytes(zip.data(), zip.size(), "model.pt");
    ADD_FAILURE() << "no format_error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "safetensors file model.pt: this looks like a torch.save file (a zip archive)"));
  }

  // By the magic alone, whatever follows: PK\3\4 (a zip's local file header), \x80 then protocol 2 to 5.
  expect_open_error(write_raw(std::string("PK\x03\x04", 4)), {"(a zip archive)"});
  for (const char protocol : {'\x02', '\x03', '\x04', '\x05'})
    expect_open_error(write_raw(std::string("\x80", 1) + protocol + std::string(14, '\x00') + "{}"), {"(a pickle)"});
  // \x80 \x01 is not a pickle protocol torch writes: the usual message.
  expect_open_error(write_raw(std::string("\x80\x01", 2) + std::string(6, '\xff') + "{}"), {"is larger than the file"});
  // A zip whose first 8 bytes read as a length that fits the file: 50 4b 03 04 00 00 00 00 is
  // 0x04034b50 = 67324752, so 67324760 bytes (sparse) whose "header" is not JSON.
  const fs::path big = write_raw(std::string("PK\x03\x04\x00\x00\x00\x00", 8) + "not json");
  fs::resize_file(big, 8 + 0x04034b50);
  expect_open_error(big, {"(a zip archive)"});
}

// A real safetensors file may start with those bytes: a header of 0x0280 = 640 bytes has the length
// 80 02 00 00 00 00 00 00, which is a pickle's start. It opens.
TEST_F(SafeTensorsTest, ASafetensorsFileThatStartsLikeAPickleOpens) {
  std::string header = R"({"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})";
  header.append(640 - header.size(), ' ');
  const fs::path p = write(header, doubles({2.5}));
  std::ifstream in(p, std::ios::binary);
  char first[2] = {};
  in.read(first, 2);
  ASSERT_EQ(static_cast<unsigned char>(first[0]), 0x80);
  ASSERT_EQ(first[1], '\x02');
  EXPECT_EQ(SafeTensors::open(p).matrix<double>("x")(0, 0), 2.5);
}

TEST_F(SafeTensorsTest, RejectsInvalidJson) {
  expect_open_error(write(R"({"x":)", ""), {"header is not valid JSON"});
  expect_open_error(write("", ""), {"header is not valid JSON"});
  expect_open_error(write("{\"\xff\":1}", ""), {"header is not valid JSON"});  // not UTF-8
  expect_open_error(write(R"({"a":1} // comment)", ""), {"header is not valid JSON"});
}

// The header is JSON to its last byte, as Python's json.loads and the reference reader require:
// a NUL ended nlohmann's input early, so "{...}\0<garbage>" opened and the rest was ignored.
// Spaces, tabs and newlines after the object are JSON's whitespace (the writer pads with spaces).
TEST_F(SafeTensorsTest, RejectsANulByteOrGarbageAfterTheHeader) {
  const std::string entry = R"({"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})";
  const std::string d = doubles({1});
  using namespace std::string_literals;
  expect_open_error(write(entry + "\0garbage"s, d),
                    {"header is not valid JSON: it holds a NUL byte at offset 54 of its 62 bytes"});
  expect_open_error(write(entry + "\0\0\0\0\0\0"s, d), {"NUL byte at offset 54"});
  expect_open_error(write(R"({"x":{"dtype":"F64")" + "\0"s + R"(,"shape":[1],"data_offsets":[0,8]}})", d),
                    {"NUL byte at offset 19"});
  expect_open_error(write(entry + " x", d), {"header is not valid JSON", "syntax error"});
  expect_open_error(write(entry + "{}", d), {"header is not valid JSON"});
  expect_open_error(write(entry + entry, d), {"header is not valid JSON"});
  EXPECT_EQ(SafeTensors::open(write(entry + " \t\r\n  ", d)).matrix<double>("x")(0, 0), 1.0);
}

TEST_F(SafeTensorsTest, RejectsJsonThatIsNotAnObject) {
  expect_open_error(write("[1, 2]", ""), {"header is not a JSON object but array"});
  expect_open_error(write("\"x\"", ""), {"but string"});
  expect_open_error(write("null", ""), {"but null"});
  expect_open_error(one("3", ""), {"tensor \"x\" entry is not an object but number"});
}

TEST_F(SafeTensorsTest, RejectsAnUnknownDtype) {
  expect_open_error(one(R"({"dtype":"F17","shape":[1],"data_offsets":[0,8]})", doubles({1})),
                    {"tensor \"x\" has unknown dtype \"F17\""});
  expect_open_error(one(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})", floats({1})), {"unknown dtype \"f32\""});
}

TEST_F(SafeTensorsTest, RejectsMissingFields) {
  expect_open_error(one(R"({"shape":[1],"data_offsets":[0,8]})", doubles({1})), {"tensor \"x\" has no \"dtype\""});
  expect_open_error(one(R"({"dtype":"F64","data_offsets":[0,8]})", doubles({1})), {"tensor \"x\" has no \"shape\""});
  expect_open_error(one(R"({"dtype":"F64","shape":[1]})", doubles({1})), {"tensor \"x\" has no \"data_offsets\""});
}

TEST_F(SafeTensorsTest, RejectsIllTypedFields) {
  const std::string d = doubles({1});
  expect_open_error(one(R"({"dtype":3,"shape":[1],"data_offsets":[0,8]})", d),
                    {"tensor \"x\" dtype 3 is not a string"});
  expect_open_error(one(R"({"dtype":"F64","shape":"1","data_offsets":[0,8]})", d), {"shape \"1\" is not an array"});
  for (const char* shape : {"[1.0]", "[-1]", "[true]", "[\"1\"]", "[18446744073709551615]", "[[1]]"}) {
    SCOPED_TRACE(shape);
    expect_open_error(one(std::string(R"({"dtype":"F64","shape":)") + shape + R"(,"data_offsets":[0,8]})", d),
                      {"tensor \"x\" shape", "is not a list of non-negative 64-bit integers"});
  }
  for (const char* off : {"[0]", "[0,8,8]", "[\"0\",8]", "[0,-8]", "[0,8.0]", "{\"a\":0}", "8"}) {
    SCOPED_TRACE(off);
    expect_open_error(one(std::string(R"({"dtype":"F64","shape":[1],"data_offsets":)") + off + "}", d),
                      {"tensor \"x\" data_offsets", "is not [begin, end] with non-negative integers"});
  }
}

TEST_F(SafeTensorsTest, RejectsOffsetsOutsideTheData) {
  expect_open_error(one(R"({"dtype":"F64","shape":[2],"data_offsets":[0,16]})", doubles({1})),
                    {"tensor \"x\" data_offsets [0, 16] run past the data section of 8 bytes"});
  expect_open_error(one(R"({"dtype":"F64","shape":[0],"data_offsets":[9,9]})", doubles({1})), {"run past"});
}

TEST_F(SafeTensorsTest, RejectsOffsetsThatEndBeforeTheyBegin) {
  expect_open_error(one(R"({"dtype":"F64","shape":[1],"data_offsets":[8,0]})", doubles({1, 2})),
                    {"tensor \"x\" data_offsets [8, 0] end before they begin"});
}

TEST_F(SafeTensorsTest, RejectsOverlappingTensors) {
  expect_open_error(write(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},)"
                          R"("b":{"dtype":"F64","shape":[2],"data_offsets":[8,24]}})",
                          doubles({1, 2, 3})),
                    {"tensor \"b\" bytes [8, 24) overlap tensor \"a\" bytes [0, 16)"});
  expect_open_error(write(R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                          doubles({1})),
                    {"overlap tensor"});
}

TEST_F(SafeTensorsTest, RejectsAShapeThatDoesNotMatchTheBytes) {
  expect_open_error(one(R"({"dtype":"F64","shape":[2],"data_offsets":[0,8]})", doubles({1})),
                    {"tensor \"x\" data_offsets [0, 8] hold 8 bytes, but shape [2] of F64 needs 16"});
  expect_open_error(one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})", doubles({1})), {"needs 12"});
}

TEST_F(SafeTensorsTest, RejectsAShapeWhoseCountOverflows) {
  // 2^32 * 2^32 * 2^32 elements; 2^62 doubles = 2^65 bytes; and with a zero among them, the
  // other dimensions still make a count that overflows.
  expect_open_error(
      one(R"({"dtype":"F64","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]})", doubles({1})),
      {"tensor \"x\" shape [4294967296,4294967296,4294967296] has more elements than a 64-bit count"});
  expect_open_error(one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})", doubles({1})),
                    {"of F64 has more bytes than a 64-bit count holds"});
  expect_open_error(one(R"({"dtype":"F64","shape":[0,4294967296,4294967296],"data_offsets":[0,0]})", ""),
                    {"has more elements than a 64-bit count"});
}

TEST_F(SafeTensorsTest, RejectsDuplicateNames) {
  expect_open_error(write(R"({"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
                          R"("x":{"dtype":"F64","shape":[0],"data_offsets":[8,8]}})",
                          doubles({1})),
                    {"header names \"x\" twice"});
  expect_open_error(one(R"({"dtype":"F64","dtype":"F32","shape":[1],"data_offsets":[0,8]})", doubles({1})),
                    {"header entry \"x\" has the key \"dtype\" twice"});
  expect_open_error(write(R"({"__metadata__":{"k":"1","k":"2"}})", ""),
                    {"header entry \"__metadata__\" has the key \"k\" twice"});
}

TEST_F(SafeTensorsTest, RejectsNonStringMetadata) {
  expect_open_error(write(R"({"__metadata__":{"k":3}})", ""), {"__metadata__ \"k\" is 3, not a string"});
  expect_open_error(write(R"({"__metadata__":{"k":null}})", ""), {"\"k\" is null, not a string"});
  expect_open_error(write(R"({"__metadata__":["k"]})", ""), {"__metadata__ is not an object but array"});
}

// --- regressions from fuzzing (fuzz/safetensors_fuzz.cpp; inputs in fuzz/corpus/safetensors_fuzz/) -

// 300,000 nested '[' (600 KB of header) overflowed the stack: nlohmann_json copies and prints
// values recursively. Nesting is limited to 64 levels, checked before nlohmann builds a value.
TEST_F(SafeTensorsTest, RejectsDeepNestingWithoutOverflowingTheStack) {
  const auto nested = [](std::size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); };
  expect_open_error(one(R"({"dtype":"F32","shape":)" + nested(300'000) + R"(,"data_offsets":[0,0]})", ""),
                    {"header nests arrays and objects deeper than 64 levels"});
  expect_open_error(write(R"({"__metadata__":{"k":)" + nested(300'000) + "}}", ""), {"deeper than 64 levels"});
  // 64 levels: the header, the entry, 62 arrays in a field the format ignores; 65 are refused.
  const auto with_note = [&](std::size_t depth) {
    return one(R"({"dtype":"F32","shape":[0],"data_offsets":[0,0],"note":)" + nested(depth) + "}", "");
  };
  EXPECT_EQ(SafeTensors::open(with_note(62)).names().size(), 1u);
  expect_open_error(with_note(63), {"deeper than 64 levels"});
}

// Opening a header of n tensors took time quadratic in n: nlohmann's ordered_json searches its
// keys linearly at each insertion, and its parser callbacks rescan the open object after each
// value (40,000 tensors took 5 s; a 100 MB header would take hours). Four times the tensors must
// now take about four times as long, not sixteen; the best of three runs each, in memory.
// A header of many tensors opens in the header's order. (It once took time quadratic in their
// number: 40,000 tensors 5.6 s, now 0.5 s. Speed belongs in a benchmark, not in a timed unit test,
// so this one only checks the result.)
TEST_F(SafeTensorsTest, OpensManyTensorsInHeaderOrder) {
  const int n = 20000;
  std::string h = "{";
  for (int i = 0; i < n; ++i)
    h += (i ? ",\"t" : "\"t") + std::to_string(n - i) + R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
  const std::string file = frame(h + "}", "");
  const SafeTensors st = SafeTensors::from_bytes(file.data(), file.size());
  ASSERT_EQ(st.names().size(), static_cast<std::size_t>(n));
  EXPECT_EQ(st.names().front(), "t" + std::to_string(n));  // the header's order, not sorted
  EXPECT_EQ(st.names().back(), "t1");
}

// from_bytes parses a copy of the bytes, exactly as open() parses a file.
TEST_F(SafeTensorsTest, FromBytesReadsWhatOpenReads) {
  const std::string bytes = frame(padded(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"), floats({1, 2}));
  std::string copy = bytes;
  const SafeTensors st = SafeTensors::from_bytes(copy.data(), copy.size(), "buffer");
  copy.assign(copy.size(), '\0');  // the caller's buffer may change or go away
  EXPECT_EQ(st.path(), "buffer");
  EXPECT_EQ(st.map<float>("w")(0, 1), 2.0f);  // aligned like a mapping: map() views it
  EXPECT_EQ(st.matrix<double>("w"), SafeTensors::open(write_raw(bytes)).matrix<double>("w"));
  try {
    (void)SafeTensors::from_bytes(bytes.data(), 7);
    ADD_FAILURE() << "no format_error";
  } catch (const attn::format_error& e) {
    EXPECT_TRUE(mentions(e.what(), "safetensors file <memory>: is 7 bytes long"));
  }
  EXPECT_THROW((void)SafeTensors::from_bytes(nullptr, 8), attn::argument_error);
  EXPECT_THROW((void)SafeTensors::from_bytes(nullptr, 0), attn::format_error);  // 0 bytes: too short
}

// --- writing ---------------------------------------------------------------------------------------

TEST_F(SafeTensorsTest, WritesTheFormatByteForByte) {
  StateDict<float> sd;
  sd.set("b", Tensor<float>::from_vector(attn_test::vec<float>({1, -2})));
  sd.set("a", Tensor<float>({1, 1}, attn_test::mat<float>({{0.5}})));
  const fs::path p = path("w.safetensors");
  attn::io::save_safetensors(p, sd, {{"k", "v"}});

  // Metadata first, then the names sorted, their data in that order; 135 bytes of JSON padded to 136.
  std::string header = R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  ASSERT_EQ(header.size(), 135u);
  header += " ";
  std::ifstream in(p, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes, frame(header, floats({0.5f, 1, -2})));
  EXPECT_FALSE(fs::exists(path("w.safetensors.partial")));
}

template <class T>
class SafeTensorsRoundTrip : public attn_test::TempDirTest {};
TYPED_TEST_SUITE(SafeTensorsRoundTrip, attn_test::Scalars, attn_test::ScalarName);

TYPED_TEST(SafeTensorsRoundTrip, IsBitExactAndMappable) {
  using T = TypeParam;
  attn::Matrix<T> m(3, 5);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(std::sin(1.0 + double(i)) * 1e3);
  m(0, 0) = -T(0);
  m(0, 1) = std::numeric_limits<T>::infinity();
  m(0, 2) = std::numeric_limits<T>::denorm_min();
  m(0, 3) = std::numeric_limits<T>::quiet_NaN();
  StateDict<T> sd;
  sd.set("z.matrix", Tensor<T>::from_matrix(m));
  sd.set("a.scalar", Tensor<T>({}, attn_test::mat<T>({{42}})));
  sd.set("empty", Tensor<T>({0, 4}, attn::Matrix<T>(0, 4)));
  sd.set("cube", Tensor<T>({1, 3, 5}, m));
  sd.set("odd", Tensor<T>::from_vector(attn_test::vec<T>({1, 2, 3})));
  const fs::path p = this->path("rt.safetensors");
  attn::io::save_safetensors(p, sd, {{"format", "pt"}, {"note", "é, \"quoted\""}});

  const SafeTensors st = SafeTensors::open(p);
  EXPECT_EQ(st.names(), (std::vector<std::string>{"a.scalar", "cube", "empty", "odd", "z.matrix"}));
  EXPECT_EQ(st.metadata().at("note"), "é, \"quoted\"");
  for (const auto& [name, t] : sd) {
    SCOPED_TRACE(name);
    EXPECT_EQ(st.info(name).dtype, attn::io::dtype_of<T>());
    EXPECT_EQ(st.info(name).shape, t.shape());
    const Tensor<T> back = st.tensor<T>(name);
    EXPECT_TRUE(back.is_view());  // aligned: no copy
    ASSERT_EQ(back.numel(), t.numel());
    if (t.numel()) {
      EXPECT_EQ(std::memcmp(back.data(), t.data(), sizeof(T) * static_cast<std::size_t>(t.numel())), 0);
    }
  }
  EXPECT_TRUE(std::signbit(st.map<T>("z.matrix")(0, 0)));
}

TEST_F(SafeTensorsTest, WritingReplacesAFileThatIsOpen) {
  const fs::path p = path("x.safetensors");
  StateDict<double> one, two;
  one.set("x", Tensor<double>::from_vector(attn_test::vec<double>({1, 2})));
  two.set("y", Tensor<double>::from_vector(attn_test::vec<double>({3})));
  attn::io::save_safetensors(p, one);
  const SafeTensors old = SafeTensors::open(p);
  const auto x = old.map<double>("x");
  attn::io::save_safetensors(p, two);  // renamed over it: the open file keeps its bytes
  EXPECT_EQ(x(0, 1), 2.0);
  EXPECT_EQ(SafeTensors::open(p).names(), std::vector<std::string>{"y"});
  EXPECT_TRUE(SafeTensors::open(p).metadata().empty());
}

TEST_F(SafeTensorsTest, WritingFailsCleanly) {
  StateDict<float> sd;
  sd.set("__metadata__", Tensor<float>::from_vector(attn_test::vec<float>({1})));
  EXPECT_THROW(attn::io::save_safetensors(path("m.safetensors"), sd), attn::argument_error);
  EXPECT_FALSE(fs::exists(path("m.safetensors")));

  StateDict<float> ok;
  ok.set("x", Tensor<float>::from_vector(attn_test::vec<float>({1})));
  try {
    attn::io::save_safetensors(path("no/such/dir/x.safetensors"), ok);
    ADD_FAILURE() << "wrote into a directory that does not exist";
  } catch (const std::runtime_error& e) {
    EXPECT_TRUE(mentions(e.what(), "cannot create"));
  }
  EXPECT_THROW(attn::io::save_safetensors(path("u.safetensors"), ok, {{"k", "\xff"}}), attn::argument_error);
  EXPECT_FALSE(fs::exists(path("u.safetensors.partial")));
  attn::io::save_safetensors(path("empty.safetensors"), StateDict<float>{});
  EXPECT_TRUE(SafeTensors::open(path("empty.safetensors")).names().empty());
}

TEST(SafeTensorsBuild, ReadsTheWayItWasBuiltTo) {
#if defined(ATTN_IO_NO_MMAP)
  EXPECT_EQ(ATTN_IO_MMAP, 0) << "ATTN_IO_NO_MMAP must select the read-into-memory fallback";
#else
  EXPECT_EQ(ATTN_IO_MMAP, 1) << "POSIX builds memory-map";
#endif
}

}  // namespace
