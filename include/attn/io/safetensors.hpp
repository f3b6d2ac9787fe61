// attn/io/safetensors.hpp - read and write the safetensors format (PyTorch and Hugging Face's
// tensor files), memory-mapped, zero-copy where the bytes allow it.
//
//   auto st = attn::io::SafeTensors::open("model.safetensors");
//   Eigen::Map<const attn::Matrix<float>> w = st.map<float>("out_proj.weight");  // F32: no copy
//   attn::Matrix<double> b = st.matrix<double>("bias_k");  // any float dtype, converted: [1, E]
//
// Needs nlohmann_json (3.x) besides Eigen: `find_package(nlohmann_json 3 REQUIRED)` and link
// nlohmann_json::nlohmann_json (Debian: nlohmann-json3-dev). The rest of attn does not.
//
// The format: an 8-byte little-endian header length N, N bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}          (__metadata__ optional)
// (the writer pads it with spaces so the data starts 8-byte aligned), then the data section:
// each tensor's elements, row-major, little-endian, at [begin, end) counted from the end of the
// header. Tensors are read as matrices as attn/io/tensor.hpp says: [d0, d1*...*dn], a 1-D tensor
// [1, n], a scalar [1, 1].
//
// Every malformed file is an attn::format_error naming the file, the tensor and the problem; a
// check runs before every read and every allocation, so no file, however crafted, reads out of
// bounds, and reading a header allocates at most 5 times the file's size plus 1 MiB
// (detail::header_memory_factor; a header that would need more is refused): a short file, a
// header length past the end, JSON that does not parse to its last byte (a NUL byte or anything
// but spaces after the object), is not an object or nests arrays and objects deeper than 64
// levels (a valid header needs 3), a tensor or metadata key named twice, a tensor's field given
// twice, an unknown dtype, a missing or ill-typed field, offsets outside the data or ending before
// they begin, tensors that overlap, a shape whose element count overflows or does not match the
// bytes, non-string metadata. A file torch.save wrote (a zip archive or a pickle) is named as one,
// with the way out: tools/export_state_dict.py. Unknown fields in a tensor's entry are ignored,
// and so are gaps between tensors (the reference Rust reader rejects gaps; nothing here depends on
// their absence). Opening takes time linear in the header's size (and one sort of the tensors by
// offset).
//
// Opening refuses anything but a regular file (a FIFO, a directory, a device) before it could
// block. On POSIX systems the file is memory-mapped (read-only, private) unless open() is asked to
// read it (FileAccess::Read, which says when to); elsewhere, or with ATTN_IO_NO_MMAP defined, it
// is always read into memory; SafeTensors::from_bytes parses a copy of bytes already in memory,
// with the same checks. A SafeTensors and everything handed out by tensor() keep the bytes alive;
// a Map from map() is valid while some SafeTensors copy of the file lives. A mapped file must not
// be truncated or rewritten in place while it is open (FileAccess::Map says what happens;
// save_safetensors replaces files by renaming, which is safe).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/error.hpp"
#include "attn/io/tensor.hpp"
#include "attn/types.hpp"

#if defined(__unix__) || defined(__APPLE__)
#define ATTN_IO_POSIX 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#else
#define ATTN_IO_POSIX 0
#endif
#if ATTN_IO_POSIX && !defined(ATTN_IO_NO_MMAP)
#define ATTN_IO_MMAP 1
#else
#define ATTN_IO_MMAP 0
#endif

namespace attn::io {

// The element types of the format. Every one can be listed and described (info()); the floating
// ones convert to float and double (matrix()), BOOL reads as a mask (mask()).
enum class DType { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

namespace detail {
struct DTypeInfo {
  const char* name;
  std::size_t size;  // bytes per element
  bool floating;
};
// Indexed by DType, in its order.
inline const DTypeInfo& dtype_info(DType t) {
  static constexpr DTypeInfo table[] = {
      {"BOOL", 1, false}, {"U8", 1, false},  {"I8", 1, false},  {"F8_E5M2", 1, true}, {"F8_E4M3", 1, true},
      {"I16", 2, false},  {"U16", 2, false}, {"F16", 2, true},  {"BF16", 2, true},    {"I32", 4, false},
      {"U32", 4, false},  {"F32", 4, true},  {"I64", 8, false}, {"U64", 8, false},    {"F64", 8, true}};
  static_assert(sizeof(table) / sizeof(table[0]) == static_cast<std::size_t>(DType::F64) + 1);
  return table[static_cast<std::size_t>(t)];
}
}  // namespace detail

inline const char* dtype_name(DType t) { return detail::dtype_info(t).name; }
inline std::size_t dtype_size(DType t) { return detail::dtype_info(t).size; }
inline bool is_floating(DType t) { return detail::dtype_info(t).floating; }

// The dtype whose bytes are a T: F32 for float, F64 for double.
template <class T>
constexpr DType dtype_of() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attn::io reads float and double");
  return std::is_same_v<T, float> ? DType::F32 : DType::F64;
}

// One tensor's entry in the header.
struct TensorInfo {
  DType dtype = DType::F32;
  TensorShape shape;        // [] for a scalar
  std::uint64_t begin = 0;  // byte range [begin, end) in the data section
  std::uint64_t end = 0;
  Index numel() const { return io::numel(shape); }
  Index rows() const { return matrix_dims(shape).first; }  // the matrix attn reads: [d0, d1*...*dn]
  Index cols() const { return matrix_dims(shape).second; }
};

using Metadata = std::map<std::string, std::string>;

// How SafeTensors::open and Checkpoint::open get at a file's bytes.
enum class FileAccess {
  // Memory-mapped (POSIX; read-only, private): nothing is read until it is used, and map() and
  // tensor() view the file's pages. The file must not change while it is open: if another process
  // truncates it, the next read of a lost page kills this one with SIGBUS; if it rewrites it in
  // place, what the views show may change. (save_safetensors replaces files by renaming: safe.)
  Map,
  // Read into memory when opened (one copy of the file): later changes to the file do nothing.
  // For files other processes may write, shared or network file systems, and the untrusted.
  Read,
};

namespace detail {

// The largest header accepted, as the reference implementation: 100 MB.
constexpr std::uint64_t max_header_bytes = 100'000'000;
// The deepest nesting of arrays and objects accepted in a header. A valid one needs 3 levels (the
// header, an entry, its shape); unknown fields may nest further, up to this. (When the header was
// parsed into a nlohmann document, a few hundred thousand '[' overflowed the stack: its values
// are copied and destroyed recursively.)
constexpr int max_header_depth = 64;
// Reading a header allocates at most this many times the file's size, plus the slack (for tiny
// files); a header that would need more is refused. Real files are mostly tensor data and need a
// small fraction of it; a header-only file of 1.5 million empty tensors (89 MB) needs 1.74
// times, a shape of many dimensions 4 times (8 bytes for each "1," of text). nlohmann's lexer
// alone may take 5 times the longest string (two buffers that double as they grow), so a header
// that is one long string is what meets the limit. (FileAccess::Read adds the file's size.)
constexpr std::uint64_t header_memory_factor = 5;
constexpr std::uint64_t header_memory_slack = 1 << 20;

// The dtype a header names, or false.
inline bool parse_dtype(const std::string& s, DType& out) {
  for (int i = 0; i <= static_cast<int>(DType::F64); ++i) {
    if (s == dtype_info(static_cast<DType>(i)).name) {
      out = static_cast<DType>(i);
      return true;
    }
  }
  return false;
}

inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// The unsigned integer U stored little-endian at p, whatever the host's byte order.
template <class U>
U load_le(const unsigned char* p) {
  U v = 0;
  for (std::size_t b = sizeof(U); b-- > 0;) v = static_cast<U>((v << 8) | p[b]);
  return v;
}

template <class F, class U>
F bit_cast(U u) {
  static_assert(sizeof(F) == sizeof(U));
  F f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Every half is a float exactly:
//   exponent 0:  mantissa * 2^-24 (zero and subnormals); exponent 31: inf or NaN;
//   otherwise:   (1024 + mantissa) * 2^(exponent - 25).
inline float half_to_float(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const float x = e == 0    ? std::ldexp(static_cast<float>(m), -24)
                  : e == 31 ? (m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity())
                            : std::ldexp(static_cast<float>(1024 + m), e - 25);
  return (h & 0x8000) ? -x : x;
}

// bfloat16 is the top half of a float.
inline float bf16_to_float(std::uint16_t h) { return bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

// float8 e5m2 is the top byte of a half.
inline float f8_e5m2_to_float(std::uint8_t b) { return half_to_float(static_cast<std::uint16_t>(b << 8)); }

// float8 e4m3fn (PyTorch's float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no
// infinities, S.1111.111 is NaN; exponent 0: mantissa * 2^-9, else (8 + mantissa) * 2^(e - 10).
inline float f8_e4m3_to_float(std::uint8_t b) {
  const int e = (b >> 3) & 0xf, m = b & 0x7;
  const float x = e == 15 && m == 7 ? std::numeric_limits<float>::quiet_NaN()
                  : e == 0          ? std::ldexp(static_cast<float>(m), -9)
                                    : std::ldexp(static_cast<float>(8 + m), e - 10);
  return (b & 0x80) ? -x : x;
}

// The bytes of a file: mapped read-only, or read into memory; or a copy of bytes the caller
// already holds (SafeTensors::from_bytes). Immutable once open.
class FileBytes {
 public:
  // Exactly `size` bytes, unpadded, so a read past the end is a bug that AddressSanitizer sees.
  // operator new aligns them for any scalar, as a mapping is.
  FileBytes(const unsigned char* data, std::size_t size) : copy_(data, data + size), copied_(true), size_(size) {}
  // The file at `path`, which must be a regular file: anything else (a FIFO, a directory, a
  // device) is refused before the file is opened for reading, so that nothing blocks. `what`
  // names the file in messages ("safetensors file x: ...").
  FileBytes(const std::string& path, FileAccess access, const std::string& what) {
#if ATTN_IO_POSIX
    // stat() first, so that a FIFO is refused before open() could wait for a writer; open() then
    // does not block (O_NONBLOCK) even if the path has become a FIFO since, and fstat() checks
    // what was opened. O_NONBLOCK changes nothing for a regular file.
    struct stat st = {};
    if (::stat(path.c_str(), &st) != 0) fail(what, "cannot open the file: ");
    require_regular(st.st_mode, what);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) fail(what, "cannot open the file: ");
    const auto close_and_fail = [&](const char* why) {
      const int err = errno;
      ::close(fd);
      errno = err;
      fail(what, why);
    };
    if (::fstat(fd, &st) != 0) close_and_fail("cannot stat the file: ");
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      require_regular(st.st_mode, what);
    }
    size_ = static_cast<std::size_t>(st.st_size);
#if ATTN_IO_MMAP
    if (access == FileAccess::Map) {
      if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) close_and_fail("cannot map the file: ");
        map_ = p;
      }
      mapped_ = true;
      ::close(fd);  // the mapping stays valid
      return;
    }
#endif
    (void)access;
    try {
      words_.resize((size_ + 7) / 8);  // 8-byte aligned, as a mapping is
    } catch (const std::bad_alloc&) {
      ::close(fd);
      throw;
    }
    auto* out = reinterpret_cast<char*>(words_.data());
    for (std::size_t done = 0; done < size_;) {
      const ::ssize_t got = ::read(fd, out + done, std::min<std::size_t>(size_ - done, std::size_t(1) << 30));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) close_and_fail("cannot read the file: ");
      if (got == 0) {  // another process truncated it since fstat()
        ::close(fd);
        throw format_error(what + ": the file shrank to " + std::to_string(done) + " bytes while it was read (it had " +
                           std::to_string(size_) + ")");
      }
      done += static_cast<std::size_t>(got);
    }
    ::close(fd);
#else
    (void)access;
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec) throw format_error(what + ": cannot open the file: " + ec.message());
    if (!std::filesystem::is_regular_file(status)) throw format_error(what + ": not a regular file");
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw format_error(what + ": cannot open the file");
    const std::streamoff n = in.tellg();
    if (n < 0) throw format_error(what + ": cannot read the file's size");
    size_ = static_cast<std::size_t>(n);
    words_.resize((size_ + 7) / 8);  // 8-byte aligned, as a mapping is
    in.seekg(0);
    if (size_ > 0 && !in.read(reinterpret_cast<char*>(words_.data()), static_cast<std::streamsize>(size_)))
      throw format_error(what + ": cannot read the file");
#endif
  }
  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() {
#if ATTN_IO_MMAP
    if (map_) ::munmap(map_, size_);
#endif
  }

  const unsigned char* data() const {
    if (copied_) return copy_.data();
#if ATTN_IO_MMAP
    if (map_) return static_cast<const unsigned char*>(map_);
#endif
    return reinterpret_cast<const unsigned char*>(words_.data());
  }
  std::size_t size() const { return size_; }
  // Whether the bytes are the file's pages, mapped (FileAccess::Map on POSIX), rather than a copy.
  bool mapped() const { return mapped_; }

  // Hands the mapped pages of bytes [begin, end) back (madvise MADV_DONTNEED): they leave this
  // process's resident memory and, read again, come back from the file (read-only and private,
  // so nothing is lost). For a loader that has copied them. A no-op without a mapping.
  void release(std::size_t begin, std::size_t end) const {
#if ATTN_IO_MMAP && defined(MADV_DONTNEED)
    if (!map_ || end <= begin || end > size_) return;
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t first = begin / page * page, last = (end + page - 1) / page * page;
    ::madvise(static_cast<char*>(map_) + first, std::min(last, (size_ + page - 1) / page * page) - first,
              MADV_DONTNEED);
#else
    (void)begin, (void)end;
#endif
  }

 private:
#if ATTN_IO_POSIX
  [[noreturn]] static void fail(const std::string& what, const char* why) {
    throw format_error(what + ": " + why + std::generic_category().message(errno));
  }
  // A format_error naming the kind of file, unless `mode` is a regular file's.
  static void require_regular(mode_t mode, const std::string& what) {
    if (S_ISREG(mode)) return;
    const char* kind = S_ISFIFO(mode)   ? "a FIFO (named pipe)"
                       : S_ISDIR(mode)  ? "a directory"
                       : S_ISCHR(mode)  ? "a character device"
                       : S_ISBLK(mode)  ? "a block device"
                       : S_ISSOCK(mode) ? "a socket"
                                        : "not a file";
    throw format_error(what + ": is " + kind + ", not a regular file");
  }
#endif
#if ATTN_IO_MMAP
  void* map_ = nullptr;
#endif
  bool mapped_ = false;
  std::vector<std::uint64_t> words_;
  std::vector<unsigned char> copy_;
  bool copied_ = false;
  std::size_t size_ = 0;
};

// The first pass over a header, through nlohmann's SAX interface (no value is built): whether it
// is valid JSON (the parse error if not), nesting deeper than max_header_depth (the scan stops
// there), how many keys the top-level object has, and the longest string or number in it (the
// parser's buffers grow to a few times that).
class HeaderScan final : public nlohmann::json_sax<nlohmann::json> {
 public:
  std::size_t keys = 0;           // the top-level object's keys
  std::size_t longest = 0;        // the longest token: a key, a string, a number's text
  std::size_t longest_array = 0;  // the most elements of an array three levels deep (a shape's)
  bool too_deep = false;
  std::string error;  // the parse error, when the JSON is invalid

  bool null() override { return element(); }
  bool boolean(bool /*value*/) override { return element(); }
  bool number_integer(number_integer_t /*value*/) override { return element(20); }
  bool number_unsigned(number_unsigned_t /*value*/) override { return element(20); }
  bool number_float(number_float_t /*value*/, const string_t& text) override { return element(text.size()); }
  bool string(string_t& value) override { return element(value.size()); }
  bool binary(binary_t& /*value*/) override { return true; }
  bool start_object(std::size_t /*elements*/) override {
    element();
    if (depth_ == 2) in_array_ = false;
    return enter();
  }
  bool key(string_t& name) override {
    if (depth_ == 1) ++keys;
    longest = std::max(longest, name.size());
    return true;
  }
  bool end_object() override {
    --depth_;
    return true;
  }
  bool start_array(std::size_t /*elements*/) override {
    element();
    if (depth_ == 2) in_array_ = true, elements_ = 0;
    return enter();
  }
  bool end_array() override {
    if (--depth_ == 2) longest_array = std::max(longest_array, elements_);
    return true;
  }
  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& e) override {
    error = e.what();
    return false;
  }

 private:
  bool element(std::size_t token = 0) {
    longest = std::max(longest, token);
    if (depth_ == 3 && in_array_) ++elements_;
    return true;
  }
  bool enter() {
    too_deep = ++depth_ > max_header_depth;
    return !too_deep;
  }
  int depth_ = 0;             // arrays and objects open
  bool in_array_ = false;     // the value open three levels deep is an array
  std::size_t elements_ = 0;  // its elements so far
};

// Positions in a list of names, found by name: open addressing with linear probing in a
// power-of-two table at most half full, 4 bytes a slot.
class NameIndex {
 public:
  static constexpr std::uint32_t none = std::numeric_limits<std::uint32_t>::max();
  static std::size_t slots_for(std::size_t names) {
    std::size_t s = 16;
    while (s < 2 * names) s *= 2;
    return s;
  }
  void reserve(std::size_t names) { slots_.assign(slots_for(names), none); }
  // The position of `name` in `names`, or none.
  std::uint32_t find(const std::vector<std::string>& names, std::string_view name) const {
    if (slots_.empty()) return none;
    for (std::size_t s = start(name);; s = (s + 1) & (slots_.size() - 1))
      if (slots_[s] == none || names[slots_[s]] == name) return slots_[s];
  }
  // Adds names[i]; false when an equal name is there already. At most the reserved count.
  bool insert(const std::vector<std::string>& names, std::uint32_t i) {
    for (std::size_t s = start(names[i]);; s = (s + 1) & (slots_.size() - 1)) {
      if (slots_[s] == none) {
        slots_[s] = i;
        return true;
      }
      if (names[slots_[s]] == names[i]) return false;
    }
  }

 private:
  std::size_t start(std::string_view name) const { return std::hash<std::string_view>{}(name) & (slots_.size() - 1); }
  std::vector<std::uint32_t> slots_;
};

// What a header says: the tensors in the header's order, and the metadata.
struct Header {
  std::vector<std::string> names;
  std::vector<TensorInfo> infos;  // names[i]'s entry
  NameIndex index;                // names by name
  Metadata metadata;
};

// The second pass over a header, once the scan has found it valid JSON: builds the Header
// straight from nlohmann's SAX events, with no document in between, and checks every entry as it
// ends. Every allocation is charged to a budget first; one past it is a format_error.
class HeaderReader final : public nlohmann::json_sax<nlohmann::json> {
 public:
  // `where` begins every message ("safetensors file x"); `data_size` is the data section's size.
  HeaderReader(Header& out, std::string where, std::uint64_t data_size, std::uint64_t budget)
      : out_(out), where_(std::move(where)), data_size_(data_size), budget_(budget) {}

  // Room for the longest shape (HeaderScan::longest_array), so that no shape reallocates.
  void reserve_shape(std::size_t dims) {
    charge(dims * sizeof(std::int64_t), "the longest shape");
    dims_.reserve(dims);
  }
  // Charges `bytes` that the header's reading is about to allocate.
  void charge(std::uint64_t bytes, const char* what) {
    used_ += bytes;
    if (used_ > budget_)
      fail_file("reading its header would allocate more than ", budget_, " bytes (", what, "): the limit is ",
                header_memory_factor, " times the file's size plus ", header_memory_slack,
                " bytes, so that a crafted header cannot exhaust memory");
  }
  // The bytes a string holds outside itself (none while it fits in its small-string buffer).
  static std::uint64_t heap_bytes(const std::string& s) {
    static const std::size_t inline_capacity = std::string().capacity();
    return s.capacity() > inline_capacity ? s.capacity() + 1 + malloc_overhead : 0;
  }

  bool null() override {
    return scalar("null", [] { return std::string("null"); });
  }
  bool boolean(bool value) override {
    return scalar("boolean", [value] { return std::string(value ? "true" : "false"); });
  }
  bool number_integer(number_integer_t value) override {
    return scalar("number", [value] { return std::to_string(value); });
  }
  bool number_unsigned(number_unsigned_t value) override {
    const std::uint64_t u = value;
    return scalar(
        "number", [u] { return std::to_string(u); }, &u);
  }
  bool number_float(number_float_t /*value*/, const string_t& text) override {
    return scalar("number", [&text] { return text; });
  }
  bool string(string_t& value) override {
    return scalar(
        "string", [&value] { return nlohmann::json(value).dump(); }, nullptr, &value);
  }
  bool binary(binary_t& /*value*/) override { return true; }  // not in JSON text

  bool key(string_t& name) override {
    if (depth_ == 1) {
      name_ = name;
      in_metadata_ = name_ == "__metadata__";
      if (in_metadata_ && seen_metadata_) fail_file("header names \"__metadata__\" twice");
      seen_metadata_ = seen_metadata_ || in_metadata_;
    } else if (depth_ == 2 && in_metadata_) {
      key_ = name;
    } else if (depth_ == 2) {
      const char* const fields[] = {"dtype", "shape", "data_offsets"};
      field_ = Field::Other;
      for (int f = 0; f < 3; ++f) {
        if (name != fields[f]) continue;
        if (seen_ & (1u << f)) fail_file("header entry \"", name_, "\" has the key \"", name, "\" twice");
        seen_ |= 1u << f;
        field_ = static_cast<Field>(f);
      }
    }
    return true;
  }

  bool start_object(std::size_t /*elements*/) override { return open(false); }
  bool start_array(std::size_t /*elements*/) override { return open(true); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& e) override {
    fail_file("header is not valid JSON: ", e.what());  // the scan found none
  }

 private:
  static constexpr std::uint64_t malloc_overhead = 16;  // what the allocator keeps beside a block
  enum class Field { Dtype, Shape, Offsets, Other };

  template <class... Parts>
  [[noreturn]] void fail_file(const Parts&... parts) const {
    throw format_error(attn::detail::concat(where_, ": ", parts...));
  }
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    fail_file("tensor \"", name_, "\" ", parts...);
  }
  [[noreturn]] void not_an_entry(const char* type) const {
    if (in_metadata_) fail_file("__metadata__ is not an object but ", type);
    fail("entry is not an object but ", type);
  }
  [[noreturn]] void not_a_shape(const std::string& what) const {
    fail("shape holds ", what, ", so it is not a list of non-negative 64-bit integers");
  }
  [[noreturn]] void not_offsets(const std::string& what) const {
    fail("data_offsets ", what, ", so it is not [begin, end] with non-negative integers");
  }

  // A value that is not an array or object: `type` as nlohmann names it, `text` its JSON, `u` its
  // value when it is a non-negative integer, `s` when it is a string.
  template <class Text>
  bool scalar(const char* type, const Text& text, const std::uint64_t* u = nullptr, const std::string* s = nullptr) {
    if (depth_ == 0) fail_file("header is not a JSON object but ", type);
    if (depth_ == 1) not_an_entry(type);
    if (depth_ == 2 && in_metadata_) {
      if (!s) fail_file("__metadata__ \"", key_, "\" is ", text(), ", not a string");
      add_metadata(*s);
    } else if (depth_ == 2) {
      switch (field_) {
        case Field::Dtype:
          if (!s) fail("dtype ", text(), " is not a string");
          if (!parse_dtype(*s, entry_.dtype)) fail("has unknown dtype ", text());
          break;
        case Field::Shape:
          fail("shape ", text(), " is not an array");
        case Field::Offsets:
          not_offsets("is " + text());
        case Field::Other:
          break;
      }
    } else if (depth_ == 3 && field_ == Field::Shape) {
      if (!u || *u > std::uint64_t(std::numeric_limits<std::int64_t>::max())) not_a_shape(text());
      dims_.push_back(static_cast<std::int64_t>(*u));  // within the capacity reserve() gave it
    } else if (depth_ == 3 && field_ == Field::Offsets) {
      if (!u) not_offsets("holds " + text());
      if (offsets_ == 2) not_offsets("has more than 2 values");
      offset_[offsets_++] = *u;
    }
    return true;  // deeper: inside a field the format does not know
  }

  bool open(bool array) {
    const char* type = array ? "an array" : "an object";
    if (depth_ == 0 && array) fail_file("header is not a JSON object but array");
    if (depth_ == 1) {
      if (array) not_an_entry("array");
      entry_ = TensorInfo();
      seen_ = 0;
      field_ = Field::Other;
    } else if (depth_ == 2 && in_metadata_) {
      fail_file("__metadata__ \"", key_, "\" is ", type, ", not a string");
    } else if (depth_ == 2) {
      switch (field_) {
        case Field::Dtype:
          fail("dtype is ", type, ", not a string");
        case Field::Shape:
          if (!array) fail("shape is ", type, ", not an array");
          dims_.clear();
          break;
        case Field::Offsets:
          if (!array) not_offsets(std::string("is ") + type);
          offsets_ = 0;
          break;
        case Field::Other:
          break;
      }
    } else if (depth_ == 3 && field_ == Field::Shape) {
      not_a_shape(type);
    } else if (depth_ == 3 && field_ == Field::Offsets) {
      not_offsets(std::string("holds ") + type);
    }
    ++depth_;
    return true;
  }

  bool close() {
    --depth_;
    if (depth_ == 2 && !in_metadata_ && field_ == Field::Shape) {
      charge(dims_.empty() ? 0 : dims_.size() * sizeof(std::int64_t) + malloc_overhead, "a tensor's shape");
      entry_.shape.assign(dims_.begin(), dims_.end());
    } else if (depth_ == 2 && !in_metadata_ && field_ == Field::Offsets) {
      if (offsets_ != 2) not_offsets("has " + std::to_string(offsets_) + (offsets_ == 1 ? " value" : " values"));
      entry_.begin = offset_[0];
      entry_.end = offset_[1];
    } else if (depth_ == 1 && in_metadata_) {
      in_metadata_ = false;
    } else if (depth_ == 1) {
      add_entry();
    }
    return true;
  }

  void add_metadata(const std::string& value) {
    charge(sizeof(std::pair<const std::string, std::string>) + 4 * sizeof(void*) + malloc_overhead + heap_bytes(key_) +
               heap_bytes(value),
           "the metadata");
    if (!out_.metadata.emplace(key_, value).second)
      fail_file("header entry \"__metadata__\" has the key \"", key_, "\" twice");
  }

  // The entry that has just ended: its fields present, consistent, inside the data section.
  void add_entry() {
    const char* const fields[] = {"dtype", "shape", "data_offsets"};
    for (int f = 0; f < 3; ++f)
      if (!(seen_ & (1u << f))) fail("has no \"", fields[f], "\"");
    TensorInfo& t = entry_;
    const Index count = t.numel();
    if (count < 0) fail("shape ", compact(t.shape), " has more elements than a 64-bit count holds");
    const std::uint64_t esize = dtype_size(t.dtype);
    if (static_cast<std::uint64_t>(count) > std::numeric_limits<std::uint64_t>::max() / esize)
      fail("shape ", compact(t.shape), " of ", dtype_name(t.dtype), " has more bytes than a 64-bit count holds");
    const std::uint64_t need = static_cast<std::uint64_t>(count) * esize;
    if (t.end < t.begin) fail("data_offsets [", t.begin, ", ", t.end, "] end before they begin");
    if (t.end > data_size_)
      fail("data_offsets [", t.begin, ", ", t.end, "] run past the data section of ", data_size_, " bytes");
    if (t.end - t.begin != need)
      fail("data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin, " bytes, but shape ", to_string(t.shape),
           " of ", dtype_name(t.dtype), " needs ", need);
    std::string name = name_;  // an exact-size copy
    charge(heap_bytes(name), "a tensor's name");
    out_.names.push_back(std::move(name));
    out_.infos.push_back(std::move(t));
    if (!out_.index.insert(out_.names, static_cast<std::uint32_t>(out_.names.size() - 1)))
      fail_file("header names \"", name_, "\" twice");
  }

  static std::string compact(const TensorShape& shape) {  // as JSON writes it: [2,3]
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
    return s + "]";
  }

  Header& out_;
  const std::string where_;
  const std::uint64_t data_size_, budget_;
  std::uint64_t used_ = 0;
  int depth_ = 0;     // arrays and objects open
  std::string name_;  // the top-level key whose value is being read
  bool in_metadata_ = false, seen_metadata_ = false;
  std::string key_;                 // the __metadata__ key whose value is being read
  TensorInfo entry_;                // the entry being read
  unsigned seen_ = 0;               // its fields seen so far: bit f for fields[f]
  Field field_ = Field::Other;      // the field being read
  std::vector<std::int64_t> dims_;  // the shape being read
  std::uint64_t offset_[2] = {0, 0};
  int offsets_ = 0;
};

}  // namespace detail

// A safetensors file, open for reading. Cheap to copy (copies share the mapping); every const
// member may be called from several threads at once.
//
//   auto st = attn::io::SafeTensors::open(path);
//   for (const std::string& name : st.names()) std::cout << name << attn::io::to_string(st.info(name).shape);
//   attn::Matrix<float> w = st.matrix<float>("weight");
class SafeTensors {
 public:
  // `access`: FileAccess::Map (the default; read the hazard at FileAccess) or FileAccess::Read.
  // Without POSIX, or with ATTN_IO_NO_MMAP defined, every file is read. Anything but a regular
  // file (a FIFO, a directory, a device) is a format_error, before anything could block.
  static SafeTensors open(const std::filesystem::path& path, FileAccess access = FileAccess::Map) {
    SafeTensors f;
    f.path_ = path.string();
    f.file_ = std::make_shared<const detail::FileBytes>(f.path_, access, "safetensors file " + f.path_);
    f.parse();
    return f;
  }

  // The same for a file already in memory: a copy of the `size` bytes at `data` (the caller's
  // buffer may go away at once), checked as open() checks a file; `name` stands for the path in
  // messages and in path().
  //   auto st = attn::io::SafeTensors::from_bytes(buf.data(), buf.size(), "download");
  static SafeTensors from_bytes(const void* data, std::size_t size, const std::string& name = "<memory>") {
    attn::detail::require_arg(data != nullptr || size == 0, "attn::io::SafeTensors::from_bytes", "null data for ", size,
                              " bytes");
    SafeTensors f;
    f.path_ = name;
    f.file_ = std::make_shared<const detail::FileBytes>(static_cast<const unsigned char*>(data), size);
    f.parse();
    return f;
  }

  const std::string& path() const { return path_; }
  // Whether the file is memory-mapped (FileAccess::Map on POSIX) rather than held in memory.
  bool mapped() const { return file_->mapped(); }

  // Tensor names in the header's order (__metadata__ is not one).
  const std::vector<std::string>& names() const { return header_->names; }
  bool contains(const std::string& name) const {
    return header_->index.find(header_->names, name) != detail::NameIndex::none;
  }
  const TensorInfo& info(const std::string& name) const {
    const std::uint32_t i = header_->index.find(header_->names, name);
    if (i == detail::NameIndex::none) fail_absent(name);
    return header_->infos[i];
  }
  // __metadata__, empty when the file has none.
  const Metadata& metadata() const { return header_->metadata; }

  // The raw little-endian bytes of a tensor: info(name).end - info(name).begin of them.
  const unsigned char* bytes(const std::string& name) const { return data_ + info(name).begin; }
  // Shared ownership of the file's bytes: a view of bytes() stays valid while a copy lives (as the
  // views tensor() hands out do).
  std::shared_ptr<const void> keep_alive() const { return file_; }
  // Drops a tensor's mapped pages from this process's resident memory once it has been copied
  // (FileBytes::release; reading it again faults them back in from the file). Best effort.
  void release(const std::string& name) const {
    const TensorInfo& t = info(name);
    const std::size_t offset = static_cast<std::size_t>(data_ - file_->data());
    file_->release(offset + t.begin, offset + t.end);
  }

  // A float tensor as an owned matrix [d0, d1*...*dn] (1-D: [1, n]; scalar: [1, 1]), converted
  // from F64, F32, F16, BF16, F8_E5M2 or F8_E4M3 as a static_cast would (F64 -> float rounds to
  // nearest; the narrower types are exact in float).
  template <class T>
  Matrix<T> matrix(const std::string& name) const {
    const TensorInfo& t = float_info(name);
    Matrix<T> m(t.rows(), t.cols());
    convert(name, t, m.data());
    return m;
  }

  // A float tensor with at most one dimension other than 1 ([n], [1, 1, n], [n, 1], []) as an
  // owned vector of its elements, converted as matrix() does.
  template <class T>
  Vector<T> vector(const std::string& name) const {
    const TensorInfo& t = float_info(name);
    const auto non_unit = std::count_if(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d != 1; });
    if (non_unit > 1) fail(name, "has shape ", to_string(t.shape), "; a vector has at most one dimension other than 1");
    Vector<T> v(t.numel());
    convert(name, t, v.data());
    return v;
  }

  // The matrix matrix() returns, as a view of the file: no copy. The dtype must be T's (F32 for
  // float, F64 for double), the host little-endian and the data aligned for T (save_safetensors
  // and PyTorch's writer align it); otherwise a format_error that says to use matrix().
  template <class T>
  Eigen::Map<const Matrix<T>> map(const std::string& name) const {
    const TensorInfo& t = info(name);
    const char* why = unmappable<T>(t);
    if (why) fail(name, why, "; matrix<", std::is_same_v<T, float> ? "float" : "double", ">() converts it into a copy");
    return Eigen::Map<const Matrix<T>>(reinterpret_cast<const T*>(data_ + t.begin), t.rows(), t.cols());
  }

  // A float tensor as a Tensor<T>: a view of the file when map() would succeed, else a converted
  // copy. The tensor keeps the file mapped.
  template <class T>
  Tensor<T> tensor(const std::string& name) const {
    const TensorInfo& t = float_info(name);
    if (!unmappable<T>(t)) return Tensor<T>::view(t.shape, reinterpret_cast<const T*>(data_ + t.begin), file_);
    return Tensor<T>(t.shape, matrix<T>(name));
  }

  // Every tensor, in the header's order, as tensor() returns them (every one must be a float).
  template <class T>
  StateDict<T> state_dict() const {
    StateDict<T> sd;
    for (const std::string& name : names()) sd.set(name, tensor<T>(name));
    return sd;
  }

  // A BOOL tensor as a matrix [d0, d1*...*dn]; a byte other than 0 or 1 is a format_error.
  BoolMatrix mask(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (t.dtype != DType::BOOL) fail(name, "has dtype ", dtype_name(t.dtype), ", expected BOOL");
    BoolMatrix m(t.rows(), t.cols());
    const unsigned char* p = data_ + t.begin;
    for (Index i = 0; i < m.size(); ++i) {
      if (p[i] > 1) fail(name, "holds byte ", int(p[i]), " at element ", i, "; BOOL is 0 or 1");
      m.data()[i] = p[i] != 0;
    }
    return m;
  }

 private:
  SafeTensors() = default;

  template <class... Parts>
  [[noreturn]] void fail_file(const Parts&... parts) const {
    throw format_error(attn::detail::concat("safetensors file ", path_, ": ", parts...));
  }
  template <class... Parts>
  [[noreturn]] void fail(const std::string& tensor, const Parts&... parts) const {
    fail_file("tensor \"", tensor, "\" ", parts...);
  }
  [[noreturn]] void fail_absent(const std::string& name) const {
    const std::vector<std::string>& all = names();
    std::string have;
    for (std::size_t i = 0; i < all.size() && i < 8; ++i) have += (i ? ", " : "") + all[i];
    if (all.size() > 8) have += ", ...";
    fail_file("has no tensor \"", name, "\" (it has ", all.size(), all.size() == 1 ? " tensor" : " tensors",
              all.empty() ? "" : ": ", have, ")");
  }

  const TensorInfo& float_info(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (!is_floating(t.dtype)) fail(name, "has dtype ", dtype_name(t.dtype), ", not a floating-point type");
    return t;
  }

  // Why map<T>() cannot view a tensor, or nullptr when it can.
  template <class T>
  const char* unmappable(const TensorInfo& t) const {
    if (t.dtype != dtype_of<T>())
      return std::is_same_v<T, float> ? "is not F32, so map<float>() cannot view it"
                                      : "is not F64, so map<double>() cannot view it";
    if (!detail::host_is_little_endian()) return "is little-endian and this machine is not";
    if (reinterpret_cast<std::uintptr_t>(data_ + t.begin) % alignof(T) != 0)
      return "is not aligned for its type in the file";
    return nullptr;
  }

  template <class T>
  void convert(const std::string& name, const TensorInfo& t, T* out) const {
    const unsigned char* p = data_ + t.begin;
    const Index n = t.numel();
    if (t.dtype == dtype_of<T>() && detail::host_is_little_endian()) {
      if (n > 0) std::memcpy(out, p, static_cast<std::size_t>(n) * sizeof(T));
      return;
    }
    switch (t.dtype) {
      case DType::F64:
        for (Index i = 0; i < n; ++i)
          out[i] = static_cast<T>(detail::bit_cast<double>(detail::load_le<std::uint64_t>(p + 8 * i)));
        return;
      case DType::F32:
        for (Index i = 0; i < n; ++i)
          out[i] = static_cast<T>(detail::bit_cast<float>(detail::load_le<std::uint32_t>(p + 4 * i)));
        return;
      case DType::F16:
        for (Index i = 0; i < n; ++i)
          out[i] = static_cast<T>(detail::half_to_float(detail::load_le<std::uint16_t>(p + 2 * i)));
        return;
      case DType::BF16:
        for (Index i = 0; i < n; ++i)
          out[i] = static_cast<T>(detail::bf16_to_float(detail::load_le<std::uint16_t>(p + 2 * i)));
        return;
      case DType::F8_E5M2:
        for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(detail::f8_e5m2_to_float(p[i]));
        return;
      case DType::F8_E4M3:
        for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(detail::f8_e4m3_to_float(p[i]));
        return;
      default:
        fail(name, "has dtype ", dtype_name(t.dtype), ", not a floating-point type");
    }
  }

  // torch.save writes a zip archive (PyTorch >= 1.6) or, before that or with
  // _use_new_zipfile_serialization=False, a pickle: PROTO opcode 0x80 and protocol 2 to 5. Asked
  // only of a file that is already not safetensors (a header length of 0x0280 is a valid one's).
  void fail_if_torch_save(const unsigned char* file, std::size_t size) const {
    const char* kind = nullptr;
    if (size >= 4 && std::memcmp(file, "PK\x03\x04", 4) == 0) kind = "a zip archive";
    if (size >= 2 && file[0] == 0x80 && file[1] >= 2 && file[1] <= 5) kind = "a pickle";
    if (kind)
      fail_file("this looks like a torch.save file (", kind,
                "), not safetensors: export it with attn-export (tools/export_state_dict.py)");
  }
  [[noreturn]] void fail_not_safetensors(const unsigned char* file, std::size_t size) const {
    fail_if_torch_save(file, size);
    if (size < 8) fail_file("is ", size, " bytes long, shorter than the 8-byte header length");
    const std::uint64_t n = detail::load_le<std::uint64_t>(file);
    if (n > size - 8)
      fail_file("header length ", n, " is larger than the file (", size - 8, " bytes follow the length)");
    fail_file("header length ", n, " exceeds the limit of ", detail::max_header_bytes, " bytes");
  }

  void parse() {
    const std::size_t size = file_->size();
    const unsigned char* file = file_->data();
    if (size < 8) fail_not_safetensors(file, size);
    const std::uint64_t n = detail::load_le<std::uint64_t>(file);
    if (n > size - 8 || n > detail::max_header_bytes) fail_not_safetensors(file, size);
    const char* header = reinterpret_cast<const char*>(file + 8);
    data_ = file + 8 + n;
    data_size_ = size - 8 - static_cast<std::size_t>(n);

    // A NUL ends nlohmann's input early (a C string's end), so a header "{...}\0<anything>"
    // would parse; JSON allows no NUL byte, and Python's json and the reference reader refuse it.
    if (const void* nul = std::memchr(header, 0, static_cast<std::size_t>(n))) {
      fail_if_torch_save(file, size);
      fail_file("header is not valid JSON: it holds a NUL byte at offset ", static_cast<const char*>(nul) - header,
                " of its ", n, " bytes");
    }

    // Two passes over the header, each linear in its size, through nlohmann's SAX interface: no
    // JSON document is ever built (nlohmann's objects cost ~100 bytes a value, 17 times the file
    // for a header of empty tensors). The scan (detail::HeaderScan) checks that the header is
    // valid JSON to its last byte and nests no deeper than max_header_depth (nlohmann's parser is
    // iterative, but deep values would still be a stack overflow for a caller that prints them),
    // and counts the tensors. The reader (detail::HeaderReader) then builds names, entries, the
    // index by name and the metadata, each checked as it ends, within a memory budget charged
    // before each allocation.
    detail::HeaderScan scan;
    const bool valid = nlohmann::json::sax_parse(header, header + n, &scan);
    if (scan.too_deep) fail_file("header nests arrays and objects deeper than ", detail::max_header_depth, " levels");
    if (!valid) {
      fail_if_torch_save(file, size);  // a zip whose first bytes read as a length that fits
      fail_file("header is not valid JSON: ", scan.error);
    }
    auto h = std::make_shared<detail::Header>();
    {
      detail::HeaderReader reader(*h, "safetensors file " + path_, data_size_,
                                  detail::header_memory_factor * size + detail::header_memory_slack);
      const std::size_t count = scan.keys;
      // The lists and the index of `count` entries (the last slot of each: the overlap check's
      // sort below), and nlohmann's two token buffers: each up to twice the longest token, and
      // the old one beside the new while one grows.
      reader.charge(count * (sizeof(std::string) + sizeof(TensorInfo) + sizeof(std::uint32_t)) +
                        detail::NameIndex::slots_for(count) * sizeof(std::uint32_t) + 5 * scan.longest,
                    "the index of its entries");
      h->names.reserve(count);
      h->infos.reserve(count);
      h->index.reserve(count);
      reader.reserve_shape(scan.longest_array);
      nlohmann::json::sax_parse(header, header + n, &reader);
    }

    // No two tensors share a byte (an empty tensor has none to share).
    const std::vector<TensorInfo>& infos = h->infos;
    std::vector<std::uint32_t> by_offset;
    by_offset.reserve(infos.size());
    for (std::size_t i = 0; i < infos.size(); ++i)
      if (infos[i].end > infos[i].begin) by_offset.push_back(static_cast<std::uint32_t>(i));
    std::sort(by_offset.begin(), by_offset.end(), [&](std::uint32_t a, std::uint32_t b) {
      return std::tie(infos[a].begin, infos[a].end, h->names[a]) < std::tie(infos[b].begin, infos[b].end, h->names[b]);
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo &prev = infos[by_offset[i - 1]], &cur = infos[by_offset[i]];
      if (cur.begin < prev.end)
        fail(h->names[by_offset[i]], "bytes [", cur.begin, ", ", cur.end, ") overlap tensor \"",
             h->names[by_offset[i - 1]], "\" bytes [", prev.begin, ", ", prev.end, ")");
    }
    header_ = std::move(h);
  }

  std::string path_;
  std::shared_ptr<const detail::FileBytes> file_;
  const unsigned char* data_ = nullptr;  // the data section, inside *file_
  std::size_t data_size_ = 0;
  std::shared_ptr<const detail::Header> header_;  // shared by copies, as the file is
};

// Writes `tensors` as a safetensors file: names sorted (the data in that order), dtype F32 for
// float and F64 for double, shapes as the tensors say, `metadata` as __metadata__ when not empty,
// the header padded with spaces so the data starts 8-byte aligned (and so every tensor is aligned
// for map()). The file is written beside `path` and renamed over it, so a reader never sees half a
// file and a SafeTensors open on the old file keeps reading the old bytes. Throws
// attn::argument_error for a tensor named "__metadata__" or a name or metadata string that is not
// UTF-8, std::runtime_error when writing fails.
template <class T>
void save_safetensors(const std::filesystem::path& path, const StateDict<T>& tensors, const Metadata& metadata = {}) {
  const DType dtype = dtype_of<T>();
  std::vector<const typename StateDict<T>::value_type*> sorted;
  for (const auto& e : tensors) {
    attn::detail::require_arg(e.first != "__metadata__", "attn::io::save_safetensors",
                              "\"__metadata__\" cannot name a tensor");
    sorted.push_back(&e);
  }
  std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) { return a->first < b->first; });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto* e : sorted) {
    const std::uint64_t bytes = static_cast<std::uint64_t>(e->second.numel()) * sizeof(T);
    header[e->first] = {
        {"dtype", dtype_name(dtype)}, {"shape", e->second.shape()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::type_error& e) {  // a name or a metadata string that is not UTF-8
    throw argument_error(std::string("attn::io::save_safetensors: names and metadata must be UTF-8: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  const std::filesystem::path tmp = path.string() + ".partial";
  const auto write_failed = [&](const std::string& what) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw std::runtime_error("attn::io::save_safetensors: " + what);
  };
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) write_failed("cannot create " + tmp.string());
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((std::uint64_t(text.size()) >> (8 * i)) & 0xff);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    std::vector<unsigned char> swapped;
    for (const auto* e : sorted) {
      const T* p = e->second.data();
      const std::size_t n = static_cast<std::size_t>(e->second.numel());
      if (detail::host_is_little_endian()) {
        if (n) out.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n * sizeof(T)));
      } else {  // little-endian bytes, whatever the host's order
        swapped.resize(n * sizeof(T));
        for (std::size_t i = 0; i < n; ++i)
          for (std::size_t b = 0; b < sizeof(T); ++b)
            swapped[i * sizeof(T) + b] = reinterpret_cast<const unsigned char*>(p + i)[sizeof(T) - 1 - b];
        out.write(reinterpret_cast<const char*>(swapped.data()), static_cast<std::streamsize>(swapped.size()));
      }
    }
    out.flush();
    if (!out) write_failed("cannot write " + tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) write_failed("cannot rename " + tmp.string() + " to " + path.string() + ": " + ec.message());
}

}  // namespace attn::io
