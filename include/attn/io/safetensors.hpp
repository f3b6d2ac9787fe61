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
// bounds or allocates more than its own size: a short file, a header length past the end, JSON
// that does not parse, is not an object or nests arrays and objects deeper than 64 levels (a
// valid header needs 3), duplicate keys, an unknown dtype, a missing or ill-typed field, offsets
// outside the data or ending before they begin, tensors that overlap, a shape whose element
// count overflows or does not match the bytes, non-string metadata. A file torch.save wrote (a
// zip archive or a pickle) is named as one, with the way out: tools/export_state_dict.py.
// Unknown fields in a tensor's entry are ignored, and so are gaps between tensors (the reference
// Rust reader rejects gaps; nothing here depends on their absence).
//
// On POSIX systems the file is memory-mapped (read-only, private); elsewhere, or with
// ATTN_IO_NO_MMAP defined, it is read into memory; SafeTensors::from_bytes parses a copy of bytes
// already in memory, with the same checks. A SafeTensors and everything handed out by
// tensor() keep the mapping alive; a Map from map() is valid while some SafeTensors copy of the
// file lives. As with every mapped file, do not truncate it while it is open (save_safetensors
// replaces files by renaming, which is safe).
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
#include <nlohmann/json.hpp>
#include <string>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/error.hpp"
#include "attn/io/tensor.hpp"
#include "attn/types.hpp"

#if !defined(ATTN_IO_NO_MMAP) && (defined(__unix__) || defined(__APPLE__))
#define ATTN_IO_MMAP 1
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
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

namespace detail {

// The largest header accepted, as the reference implementation: 100 MB.
constexpr std::uint64_t max_header_bytes = 100'000'000;
// The deepest nesting of arrays and objects accepted in a header. A valid one needs 3 levels (the
// header, an entry, its shape); unknown fields may nest further, up to this. nlohmann_json copies
// and prints values recursively, so a header of a few hundred thousand '[' would overflow the stack.
constexpr int max_header_depth = 64;

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
  explicit FileBytes(const std::string& path) {
#if ATTN_IO_MMAP
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, "cannot open the file: ");
    struct stat st = {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      errno = err;
      fail(path, "cannot stat the file: ");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw format_error("safetensors file " + path + ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        errno = err;
        fail(path, "cannot map the file: ");
      }
      map_ = p;
    }
    ::close(fd);  // the mapping stays valid
#else
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw format_error("safetensors file " + path + ": cannot open the file");
    const std::streamoff n = in.tellg();
    if (n < 0) throw format_error("safetensors file " + path + ": cannot read the file's size");
    size_ = static_cast<std::size_t>(n);
    words_.resize((size_ + 7) / 8);  // 8-byte aligned, as a mapping is
    in.seekg(0);
    if (size_ > 0 && !in.read(reinterpret_cast<char*>(words_.data()), static_cast<std::streamsize>(size_)))
      throw format_error("safetensors file " + path + ": cannot read the file");
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
    return static_cast<const unsigned char*>(map_);
#else
    return reinterpret_cast<const unsigned char*>(words_.data());
#endif
  }
  std::size_t size() const { return size_; }

  // Hands the mapped pages of bytes [begin, end) back (madvise MADV_DONTNEED): they leave this
  // process's resident memory and, read again, come back from the file (read-only and private,
  // so nothing is lost). For a loader that has copied them. A no-op without a mapping.
  void release(std::size_t begin, std::size_t end) const {
#if ATTN_IO_MMAP && defined(MADV_DONTNEED)
    if (!map_ || copied_ || end <= begin || end > size_) return;
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    const std::size_t first = begin / page * page, last = (end + page - 1) / page * page;
    ::madvise(static_cast<char*>(map_) + first, std::min(last, (size_ + page - 1) / page * page) - first,
              MADV_DONTNEED);
#else
    (void)begin, (void)end;
#endif
  }

 private:
#if ATTN_IO_MMAP
  [[noreturn]] static void fail(const std::string& path, const char* what) {
    throw format_error("safetensors file " + path + ": " + what + std::generic_category().message(errno));
  }
  void* map_ = nullptr;
#else
  std::vector<std::uint64_t> words_;
#endif
  std::vector<unsigned char> copy_;
  bool copied_ = false;
  std::size_t size_ = 0;
};

// The first pass over a header, through nlohmann's SAX interface (no value is built): the
// header's keys in the file's order, the first key an object holds twice, nesting deeper than
// max_header_depth (the scan stops there), and the parse error of invalid JSON.
class HeaderScan final : public nlohmann::json_sax<nlohmann::json> {
 public:
  std::vector<std::string> order;  // the top-level object's keys
  std::string duplicate;           // the first key seen twice in one object
  std::string duplicate_in;        // the top-level key whose entry holds it; "" for the top level
  bool too_deep = false;
  std::string error;  // the parse error, when the JSON is invalid

  bool null() override { return true; }
  bool boolean(bool /*value*/) override { return true; }
  bool number_integer(number_integer_t /*value*/) override { return true; }
  bool number_unsigned(number_unsigned_t /*value*/) override { return true; }
  bool number_float(number_float_t /*value*/, const string_t& /*text*/) override { return true; }
  bool string(string_t& /*value*/) override { return true; }
  bool binary(binary_t& /*value*/) override { return true; }
  bool start_object(std::size_t /*elements*/) override {
    objects_.emplace_back();
    return enter();
  }
  bool key(string_t& name) override {
    if (duplicate.empty() && !objects_.back().insert(name).second) {
      duplicate = name;
      duplicate_in = depth_ >= 2 && !order.empty() ? order.back() : "";
    }
    if (depth_ == 1) order.push_back(name);
    return true;
  }
  bool end_object() override {
    objects_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t /*elements*/) override { return enter(); }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& e) override {
    error = e.what();
    return false;
  }

 private:
  bool enter() {
    too_deep = ++depth_ > max_header_depth;
    return !too_deep;
  }
  int depth_ = 0;                                         // arrays and objects open
  std::vector<std::unordered_set<std::string>> objects_;  // the keys of each open object
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
  static SafeTensors open(const std::filesystem::path& path) {
    SafeTensors f;
    f.path_ = path.string();
    f.file_ = std::make_shared<const detail::FileBytes>(f.path_);
    f.parse();
    return f;
  }

  // The same for a file already in memory: a copy of the `size` bytes at `data` (the caller's
  // buffer may go away at once), checked as open() checks a file; `name` stands for the path in
  // messages and in path().
  //   auto st = attn::io::SafeTensors::from_bytes(buf.data(), buf.size(), "download");
  static SafeTensors from_bytes(const void* data, std::size_t size, const std::string& name = "<memory>") {
    attn::detail::require_arg(data != nullptr || size == 0, "attn::io::SafeTensors::from_bytes", "null data for ",
                              size, " bytes");
    SafeTensors f;
    f.path_ = name;
    f.file_ = std::make_shared<const detail::FileBytes>(static_cast<const unsigned char*>(data), size);
    f.parse();
    return f;
  }

  const std::string& path() const { return path_; }

  // Tensor names in the header's order (__metadata__ is not one).
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const {
    const auto it = infos_.find(name);
    if (it == infos_.end()) fail_absent(name);
    return it->second;
  }
  // __metadata__, empty when the file has none.
  const Metadata& metadata() const { return metadata_; }

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
    for (const std::string& name : names_) sd.set(name, tensor<T>(name));
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
    std::string have;
    for (std::size_t i = 0; i < names_.size() && i < 8; ++i) have += (i ? ", " : "") + names_[i];
    if (names_.size() > 8) have += ", ...";
    fail_file("has no tensor \"", name, "\" (it has ", names_.size(), names_.size() == 1 ? " tensor" : " tensors",
              names_.empty() ? "" : ": ", have, ")");
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

    // Two passes over the header, each linear in its size. The scan (detail::HeaderScan) checks
    // what nlohmann's parser lets through or would choke on: duplicate keys (it keeps the last
    // silently) and nesting deep enough to overflow the stack where nlohmann recurses (printing,
    // copying); and it records the header's order, that of names(). Then the header is parsed
    // into a nlohmann::json, whose objects are std::maps: ordered_json's insertion searches its
    // keys linearly, and its parser callbacks rescan the open object at each end of a value, both
    // quadratic - hours for a header of millions of keys.
    detail::HeaderScan scan;
    const bool valid = nlohmann::json::sax_parse(header, header + n, &scan);
    if (scan.too_deep) fail_file("header nests arrays and objects deeper than ", detail::max_header_depth, " levels");
    if (!valid) {
      fail_if_torch_save(file, size);  // a zip whose first bytes read as a length that fits
      fail_file("header is not valid JSON: ", scan.error);
    }
    if (!scan.duplicate.empty()) {
      if (scan.duplicate_in.empty()) fail_file("header names \"", scan.duplicate, "\" twice");
      fail_file("header entry \"", scan.duplicate_in, "\" has the key \"", scan.duplicate, "\" twice");
    }
    nlohmann::json h;
    try {
      h = nlohmann::json::parse(header, header + n);
    } catch (const nlohmann::json::exception& e) {  // not after the scan, but never unchecked
      fail_file("header is not valid JSON: ", e.what());
    }
    if (!h.is_object()) fail_file("header is not a JSON object but ", h.type_name());

    for (const std::string& name : scan.order) {
      const nlohmann::json& entry = h.at(name);  // each key once: a duplicate failed above
      if (name == "__metadata__") {
        if (!entry.is_object()) fail_file("__metadata__ is not an object but ", entry.type_name());
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) fail_file("__metadata__ \"", key, "\" is ", value.dump(), ", not a string");
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      infos_.emplace(name, parse_entry(name, entry));
      names_.push_back(name);
    }

    // No two tensors share a byte (an empty tensor has none to share).
    std::vector<const std::pair<const std::string, TensorInfo>*> by_offset;
    for (const auto& e : infos_)
      if (e.second.end > e.second.begin) by_offset.push_back(&e);
    std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
      return std::tie(a->second.begin, a->second.end, a->first) < std::tie(b->second.begin, b->second.end, b->first);
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const auto &prev = *by_offset[i - 1], &cur = *by_offset[i];
      if (cur.second.begin < prev.second.end)
        fail(cur.first, "bytes [", cur.second.begin, ", ", cur.second.end, ") overlap tensor \"", prev.first,
             "\" bytes [", prev.second.begin, ", ", prev.second.end, ")");
    }
  }

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& e) const {
    if (!e.is_object()) fail(name, "entry is not an object but ", e.type_name());
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!e.contains(field)) fail(name, "has no \"", field, "\"");
    TensorInfo t;

    const auto& dtype = e["dtype"];
    if (!dtype.is_string()) fail(name, "dtype ", dtype.dump(), " is not a string");
    if (!parse_dtype(dtype.get<std::string>(), t.dtype)) fail(name, "has unknown dtype ", dtype.dump());

    const auto& shape = e["shape"];
    if (!shape.is_array()) fail(name, "shape ", shape.dump(), " is not an array");
    for (const auto& d : shape) {
      // nlohmann parses every non-negative integer as unsigned; -1, 2.0 and "2" are not.
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        fail(name, "shape ", shape.dump(), " is not a list of non-negative 64-bit integers");
      t.shape.push_back(static_cast<std::int64_t>(d.get<std::uint64_t>()));
    }
    const Index count = t.numel();
    if (count < 0) fail(name, "shape ", shape.dump(), " has more elements than a 64-bit count holds");
    const std::uint64_t esize = dtype_size(t.dtype);
    if (static_cast<std::uint64_t>(count) > std::numeric_limits<std::uint64_t>::max() / esize)
      fail(name, "shape ", shape.dump(), " of ", dtype_name(t.dtype), " has more bytes than a 64-bit count holds");
    const std::uint64_t need = static_cast<std::uint64_t>(count) * esize;

    const auto& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(name, "data_offsets ", off.dump(), " is not [begin, end] with non-negative integers");
    t.begin = off[0].get<std::uint64_t>();
    t.end = off[1].get<std::uint64_t>();
    if (t.end < t.begin) fail(name, "data_offsets [", t.begin, ", ", t.end, "] end before they begin");
    if (t.end > data_size_)
      fail(name, "data_offsets [", t.begin, ", ", t.end, "] run past the data section of ", data_size_, " bytes");
    if (t.end - t.begin != need)
      fail(name, "data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin, " bytes, but shape ",
           to_string(t.shape), " of ", dtype_name(t.dtype), " needs ", need);
    return t;
  }

  static bool parse_dtype(const std::string& s, DType& out) {
    for (int i = 0; i <= static_cast<int>(DType::F64); ++i) {
      if (s == dtype_name(static_cast<DType>(i))) {
        out = static_cast<DType>(i);
        return true;
      }
    }
    return false;
  }

  std::string path_;
  std::shared_ptr<const detail::FileBytes> file_;
  const unsigned char* data_ = nullptr;  // the data section, inside *file_
  std::size_t data_size_ = 0;
  std::vector<std::string> names_;
  std::unordered_map<std::string, TensorInfo> infos_;
  Metadata metadata_;
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
