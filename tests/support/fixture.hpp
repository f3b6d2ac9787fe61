// tests/support/fixture.hpp - the golden files tools/gen_fixtures.py writes, read through the
// library's reader (attn/io/safetensors.hpp), with the conventions of those files on top.
//
// A fixture is one safetensors file: F64 tensors (matrices 2-D, vectors 1-D), BOOL masks, and
// __metadata__ holding the case's configuration as strings.
//
//   attn_test::Fixture f = attn_test::Fixture::load("mha_batch_first.safetensors");
//   attn::Matrix<float> q = f.tensor<float>("query");  // 2-D, converted from F64
//   int heads = f.meta_int("num_heads");
//
// Malformed files are the reader's attn::format_error (a std::runtime_error); this layer adds
// the fixtures' own rules (ranks, numeric metadata) with std::runtime_errors naming the file.
#pragma once

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attn/io/safetensors.hpp"
#include "attn/types.hpp"

#ifndef ATTN_TEST_DATA_DIR
#error "ATTN_TEST_DATA_DIR must name the directory of the fixture files (tests/CMakeLists.txt sets it)"
#endif

namespace attn_test {

class Fixture {
 public:
  // The directory the tests read (ATTN_TEST_DATA_DIR).
  static std::filesystem::path data_dir() { return std::filesystem::path(ATTN_TEST_DATA_DIR); }

  // Case names (file names without ".safetensors") of every fixture in data_dir(), sorted
  // (subdirectories, such as state_dict/, are not cases).
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
  static Fixture load_path(const std::filesystem::path& path) { return Fixture(attn::io::SafeTensors::open(path)); }

  const std::string& path() const { return st_.path(); }
  const attn::io::SafeTensors& file() const { return st_; }

  bool has(const std::string& name) const { return st_.contains(name); }
  std::vector<std::string> names() const { return st_.names(); }

  bool has_meta(const std::string& key) const { return st_.metadata().count(key) != 0; }
  const std::string& meta(const std::string& key) const {
    const auto it = st_.metadata().find(key);
    if (it == st_.metadata().end()) fail("has no metadata \"", key, "\"");
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
    need_rank(name, 2);
    return st_.matrix<T>(name);
  }

  // A 1-D float tensor [n], converted to T.
  template <class T>
  attn::Vector<T> vec(const std::string& name) const {
    need_rank(name, 1);
    return st_.vector<T>(name);
  }

  // A 2-D BOOL tensor, values as stored (the name says the polarity).
  attn::BoolMatrix mask(const std::string& name) const {
    need_rank(name, 2);
    return st_.mask(name);
  }

  // Counts a tensor read through file() (attn::io::load_state_dict) as read; throws when absent.
  void mark_used(const std::string& name) const {
    (void)st_.info(name);
    used_.insert(name);
  }

  // Tensors no accessor has read: a test that leaves one unread ignores part of the case.
  std::vector<std::string> unused() const {
    std::vector<std::string> n;
    for (const std::string& name : st_.names())
      if (!used_.count(name)) n.push_back(name);
    std::sort(n.begin(), n.end());
    return n;
  }

 private:
  explicit Fixture(attn::io::SafeTensors st) : st_(std::move(st)) {}

  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw std::runtime_error(attn::detail::concat("fixture ", path(), ": ", parts...));
  }

  void need_rank(const std::string& name, std::size_t rank) const {
    const std::size_t r = st_.info(name).shape.size();  // throws for an absent tensor
    if (r != rank)
      fail("tensor \"", name, "\" has ", r, " dimensions, expected ", rank,
           rank == 1 ? " (use tensor<T>() for matrices)" : " (use vec<T>() for vectors)");
    used_.insert(name);
  }

  attn::io::SafeTensors st_;
  mutable std::set<std::string> used_;
};

}  // namespace attn_test
