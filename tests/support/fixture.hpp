// tests/support/fixture.hpp - reads the golden files tools/gen_fixtures.py writes (test-only).
//
// A fixture is one safetensors file: a u64 little-endian header length N, N bytes of JSON
//   {"<name>": {"dtype": "F64" | "F32" | "BOOL", "shape": [...], "data_offsets": [begin, end]},
//    "__metadata__": {"<key>": "<string>", ...}}
// and then the raw little-endian data, offsets counted from the end of the header.
//
//   attn_test::Fixture f = attn_test::Fixture::load("mha_batch_first.safetensors");
//   attn::Matrix<float> q = f.tensor<float>("query");  // 2-D, converted from F64
//   int heads = f.meta_int("num_heads");
//
// Every malformed file is a std::runtime_error naming the file and what is wrong with it.
// (A real reader belongs in the library; this one only serves the tests.)
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "attn/types.hpp"

#ifndef ATTN_TEST_DATA_DIR
#error "ATTN_TEST_DATA_DIR must name the directory of the fixture files (tests/CMakeLists.txt sets it)"
#endif

namespace attn_test {

class Fixture {
 public:
  struct Tensor {
    std::string dtype;                // "F64", "F32" or "BOOL"
    std::vector<std::int64_t> shape;  // row-major
    std::size_t begin = 0, end = 0;   // byte range inside the data section
  };

  // The directory the tests read (ATTN_TEST_DATA_DIR).
  static std::filesystem::path data_dir() { return std::filesystem::path(ATTN_TEST_DATA_DIR); }

  // Case names (file names without ".safetensors") of every fixture in data_dir(), sorted.
  static std::vector<std::string> list() {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(data_dir()))
      if (entry.is_regular_file() && entry.path().extension() == ".safetensors")
        names.push_back(entry.path().stem().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  // `file` relative to data_dir() ("mha_cross.safetensors"), or an absolute path.
  static Fixture load(const std::string& file) {
    const std::filesystem::path p(file);
    return load_path(p.is_absolute() ? p : data_dir() / p);
  }

  static Fixture load_path(const std::filesystem::path& path) {
    Fixture f;
    f.path_ = path.string();
    std::ifstream in(path, std::ios::binary);
    if (!in) f.fail("cannot open the file");
    const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (bytes.size() < 8) f.fail("file has ", bytes.size(), " bytes, fewer than the 8-byte header length");
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[static_cast<std::size_t>(i)];
    if (header_len > bytes.size() - 8)
      f.fail("header length ", header_len, " runs past the end of the file (", bytes.size() - 8, " bytes after it)");
    const auto header_begin = bytes.begin() + 8;
    const auto data_begin = header_begin + static_cast<std::ptrdiff_t>(header_len);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(header_begin, data_begin);
    } catch (const nlohmann::json::exception& e) {
      f.fail("header is not valid JSON: ", e.what());
    }
    if (!header.is_object()) f.fail("header is not a JSON object");
    f.data_.assign(data_begin, bytes.end());

    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) f.fail("__metadata__ is not an object");
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) f.fail("__metadata__ \"", key, "\" is not a string");
          f.meta_[key] = value.get<std::string>();
        }
        continue;
      }
      f.tensors_[name] = f.parse_entry(name, entry);
    }
    return f;
  }

  const std::string& path() const { return path_; }

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& t : tensors_) n.push_back(t.first);
    return n;
  }
  const Tensor& info(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail("has no tensor \"", name, "\"");
    return it->second;
  }

  bool has_meta(const std::string& key) const { return meta_.count(key) != 0; }
  const std::string& meta(const std::string& key) const {
    const auto it = meta_.find(key);
    if (it == meta_.end()) fail("has no metadata \"", key, "\"");
    return it->second;
  }
  long meta_int(const std::string& key) const {
    const std::string& s = meta(key);
    std::size_t used = 0;
    long v = 0;
    try {
      v = std::stol(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) fail("metadata \"", key, "\" = \"", s, "\" is not an integer");
    return v;
  }
  double meta_double(const std::string& key) const {
    const std::string& s = meta(key);
    std::size_t used = 0;
    double v = 0;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) fail("metadata \"", key, "\" = \"", s, "\" is not a number");
    return v;
  }
  bool meta_bool(const std::string& key) const {
    const std::string& s = meta(key);
    if (s == "true") return true;
    if (s == "false") return false;
    fail("metadata \"", key, "\" = \"", s, "\" is not true or false");
  }

  // A 2-D float tensor [rows, cols], converted to T.
  template <class T>
  attn::Matrix<T> tensor(const std::string& name) const {
    const Tensor& t = float_tensor(name, 2);
    attn::Matrix<T> m(t.shape[0], t.shape[1]);
    read_floats(t, m.data());
    return m;
  }

  // A 1-D float tensor [n], converted to T.
  template <class T>
  attn::Vector<T> vec(const std::string& name) const {
    const Tensor& t = float_tensor(name, 1);
    attn::Vector<T> v(t.shape[0]);
    read_floats(t, v.data());
    return v;
  }

  // A 2-D BOOL tensor, values as stored (the name says the polarity).
  attn::BoolMatrix mask(const std::string& name) const {
    const Tensor& t = info(name);
    if (t.dtype != "BOOL") fail("tensor \"", name, "\" has dtype ", t.dtype, ", expected BOOL");
    need_rank(name, t, 2);
    attn::BoolMatrix m(t.shape[0], t.shape[1]);
    for (Eigen::Index i = 0; i < m.size(); ++i) {
      const unsigned char b = data_[t.begin + static_cast<std::size_t>(i)];
      if (b > 1) fail("tensor \"", name, "\" holds byte ", int(b), " at element ", i, "; BOOL is 0 or 1");
      m.data()[i] = b != 0;
    }
    used_.insert(name);
    return m;
  }

  // Tensors no accessor has read: a test that leaves one unread ignores part of the case.
  std::vector<std::string> unused() const {
    std::vector<std::string> n;
    for (const auto& t : tensors_)
      if (!used_.count(t.first)) n.push_back(t.first);
    return n;
  }

 private:
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    std::string msg = "fixture " + path_ + ": ";
    ((msg += to_text(parts)), ...);
    throw std::runtime_error(msg);
  }
  static std::string to_text(const std::string& s) { return s; }
  static std::string to_text(const char* s) { return s; }
  template <class N>
  static std::string to_text(N n) {
    return std::to_string(n);
  }

  static std::size_t element_size(const std::string& dtype) {
    if (dtype == "F64") return 8;
    if (dtype == "F32") return 4;
    if (dtype == "BOOL") return 1;
    return 0;
  }

  Tensor parse_entry(const std::string& name, const nlohmann::json& e) const {
    if (!e.is_object()) fail("entry \"", name, "\" is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!e.contains(field)) fail("tensor \"", name, "\" has no \"", field, "\"");
    Tensor t;
    if (!e["dtype"].is_string()) fail("tensor \"", name, "\": dtype is not a string");
    t.dtype = e["dtype"].get<std::string>();
    const std::size_t esize = element_size(t.dtype);
    if (esize == 0) fail("tensor \"", name, "\" has dtype \"", t.dtype, "\"; this reader knows F64, F32 and BOOL");
    if (!e["shape"].is_array()) fail("tensor \"", name, "\": shape is not an array");
    std::uint64_t count = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0)
        fail("tensor \"", name, "\": shape ", e["shape"].dump(), " is not a list of non-negative integers");
      const auto n = d.get<std::uint64_t>();
      if (n != 0 && count > (std::uint64_t(1) << 40) / n) fail("tensor \"", name, "\": shape ", e["shape"].dump(), " is too large");
      count *= n;
      t.shape.push_back(static_cast<std::int64_t>(n));
    }
    const auto& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail("tensor \"", name, "\": data_offsets ", off.dump(), " is not [begin, end]");
    const auto begin = off[0].get<std::uint64_t>(), end = off[1].get<std::uint64_t>();
    if (begin > end || end > data_.size())
      fail("tensor \"", name, "\": data_offsets [", begin, ", ", end, "] are outside the data section of ",
           data_.size(), " bytes");
    if (end - begin != count * esize)
      fail("tensor \"", name, "\": data_offsets [", begin, ", ", end, "] hold ", end - begin, " bytes, but shape ",
           e["shape"].dump(), " of ", t.dtype, " needs ", count * esize);
    t.begin = static_cast<std::size_t>(begin);
    t.end = static_cast<std::size_t>(end);
    return t;
  }

  void need_rank(const std::string& name, const Tensor& t, std::size_t rank) const {
    if (t.shape.size() != rank)
      fail("tensor \"", name, "\" has ", t.shape.size(), " dimensions, expected ", rank,
           rank == 1 ? " (use tensor<T>() for matrices)" : " (use vec<T>() for vectors)");
  }

  const Tensor& float_tensor(const std::string& name, std::size_t rank) const {
    const Tensor& t = info(name);
    if (t.dtype != "F64" && t.dtype != "F32") fail("tensor \"", name, "\" has dtype ", t.dtype, ", expected F64 or F32");
    need_rank(name, t, rank);
    used_.insert(name);
    return t;
  }

  // Little-endian bytes -> T, whatever the host's byte order.
  template <class T>
  void read_floats(const Tensor& t, T* out) const {
    const std::size_t esize = element_size(t.dtype);
    const std::size_t n = (t.end - t.begin) / esize;
    for (std::size_t i = 0; i < n; ++i) {
      const unsigned char* p = data_.data() + t.begin + i * esize;
      std::uint64_t bits = 0;
      for (std::size_t b = esize; b-- > 0;) bits = (bits << 8) | p[b];
      if (esize == 8) {
        double d;
        std::memcpy(&d, &bits, sizeof d);
        out[i] = static_cast<T>(d);
      } else {
        const auto bits32 = static_cast<std::uint32_t>(bits);
        float x;
        std::memcpy(&x, &bits32, sizeof x);
        out[i] = static_cast<T>(x);
      }
    }
  }

  std::string path_;
  std::vector<unsigned char> data_;  // the data section: everything after the header
  std::map<std::string, Tensor> tensors_;
  std::map<std::string, std::string> meta_;
  mutable std::set<std::string> used_;
};

}  // namespace attn_test
