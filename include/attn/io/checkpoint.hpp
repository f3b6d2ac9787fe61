// attn/io/checkpoint.hpp - a Hugging Face checkpoint directory: config.json and the weights, in one
// safetensors file or in shards, read as one set of named tensors.
//
//   auto ckpt = attn::io::Checkpoint::open("TinyLlama-1.1B-Chat-v1.0");   // a directory
//   ckpt.config()["num_hidden_layers"];                                   // config.json, parsed
//   attn::Matrix<float> w = ckpt.matrix<float>("model.norm.weight");      // from whichever shard
//
// The layout, as transformers' save_pretrained writes it:
//   config.json                          the model's hyperparameters ("model_type", sizes, ...)
//   model.safetensors                    every tensor, or
//   model.safetensors.index.json         {"metadata": {...}, "weight_map": {name: shard file}}
//   model-00001-of-0000N.safetensors     the shards the index names
// open() also takes a single .safetensors file (no config: config() is an empty object). Every
// shard is memory-mapped (attn/io/safetensors.hpp), or read into memory with FileAccess::Read; a
// tensor the model keeps as stored (a bf16 weight kept in bf16, an F32 one in float) is a view of
// the shard's bytes, so loading a mapped checkpoint reads only the bytes it converts and a model's
// memory is what it touches.
//
// Errors are attn::format_error naming the file: no config.json, no weights, an index that is not
// JSON or has no weight_map, a shard it names that is missing or lies outside the directory, a
// tensor the index puts in a shard that does not hold it, a tensor in two shards, a tensor in a
// shard the index does not list for it.
//
// Needs nlohmann_json, as attn/io/safetensors.hpp does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/error.hpp"
#include "attn/io/safetensors.hpp"
#include "attn/io/tensor.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"
#include "attn/weight.hpp"

namespace attn::io {

class Checkpoint {
 public:
  // A checkpoint directory (config.json, then model.safetensors.index.json and its shards, or
  // model.safetensors), or one .safetensors file.
  // `access`: how each shard is read (attn/io/safetensors.hpp, FileAccess: Map by default; Read
  // for files that other processes may change). config.json and the index are always read.
  static Checkpoint open(const std::filesystem::path& path, FileAccess access = FileAccess::Map) {
    Checkpoint c(path.string());
    c.access_ = access;
    std::error_code ec;
    const bool directory = std::filesystem::is_directory(path, ec);
    if (ec && ec != std::errc::no_such_file_or_directory) c.fail("cannot be read: " + ec.message());
    if (!directory) {
      if (!c.exists(path)) c.fail("does not exist");
      c.config_ = nlohmann::json::object();
      c.add_shard(path, nullptr);
      return c;
    }
    const std::filesystem::path config_file = path / "config.json", index = path / "model.safetensors.index.json",
                                single = path / "model.safetensors";
    if (!c.exists(config_file))
      c.fail(
          "has no config.json (a Hugging Face checkpoint directory has one; open a .safetensors file alone by "
          "its path)");
    c.config_ = c.read_json(config_file);
    if (!c.config_.is_object()) c.fail("config.json is not a JSON object");
    if (c.exists(index)) {
      c.open_shards(path, index);
    } else if (c.exists(single)) {
      c.add_shard(single, nullptr);
    } else {
      c.fail(
          "has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin checkpoints are not "
          "read: convert them with tools/export_state_dict.py)");
    }
    return c;
  }

  // The directory or file opened.
  const std::string& path() const { return path_; }
  // config.json, parsed; an empty object for a single file.
  const nlohmann::json& config() const { return config_; }
  // The safetensors files, in the order of the index (or the one file).
  const std::vector<SafeTensors>& shards() const { return shards_; }

  // Every tensor name, shard by shard in each shard's header order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const { return shard(name).info(name); }
  // The shard holding `name` (format_error naming the checkpoint when none does).
  const SafeTensors& shard(const std::string& name) const {
    const auto it = where_.find(name);
    if (it == where_.end()) fail("has no tensor \"" + name + "\"");
    return shards_[it->second];
  }
  // The bytes of every tensor's data, all shards together.
  std::uint64_t data_bytes() const {
    std::uint64_t n = 0;
    for (const std::string& name : names_) n += info(name).end - info(name).begin;
    return n;
  }

  // A float tensor converted to T, as SafeTensors::matrix and ::vector.
  // Drops a tensor's mapped pages from resident memory once it has been converted or copied
  // (SafeTensors::release).
  void release(const std::string& name) const { shard(name).release(name); }

  template <class T>
  Matrix<T> matrix(const std::string& name) const {
    return shard(name).template matrix<T>(name);
  }
  template <class T>
  Vector<T> vector(const std::string& name) const {
    return shard(name).template vector<T>(name);
  }
  template <class T>
  Tensor<T> tensor(const std::string& name) const {
    return shard(name).template tensor<T>(name);
  }

  // A 2-D float tensor as a Weight<T>. With `storage` nullopt it keeps the file's type where it
  // can (BF16 as Storage::BFloat16, F16 as Float16, T's own dtype as Native); any other dtype is
  // converted to T. With a storage, the tensor is converted into it unless it already is one.
  //   map = false (the default): the Weight owns its elements (from 2 MiB up on transparent huge
  //     pages), and the file's pages it read leave this process's resident memory again
  //     (SafeTensors::release): what a model holds is one copy.
  //   map = true: a tensor already in its storage type is a view of the mapping instead - no copy,
  //     no memory until touched, but 4 KiB pages, which a decoding step streams slower (1.65x on
  //     this repository's VM: bench/RESULTS.md).
  template <class T>
  Weight<T> weight(const std::string& name, std::optional<Storage> storage = std::nullopt, bool map = false) const {
    const SafeTensors& st = shard(name);
    const TensorInfo& t = st.info(name);
    if (t.shape.size() != 2)
      fail("tensor \"" + name + "\" has shape " + to_string(t.shape) + ", expected a 2-D weight");
    // The storage the bytes already are, if any (a plain flag, not a std::optional: g++ 12 warns,
    // wrongly, that a copied optional may be uninitialized, its bug 80635).
    const bool viewable = t.dtype == DType::BF16 || t.dtype == DType::F16 || t.dtype == dtype_of<T>();
    const Storage in_place = t.dtype == DType::BF16  ? Storage::BFloat16
                             : t.dtype == DType::F16 ? Storage::Float16
                                                     : Storage::Native;
    const bool aligned = reinterpret_cast<std::uintptr_t>(st.bytes(name)) % dtype_size(t.dtype) == 0;
    Weight<T> w;
    if (viewable && (!storage || *storage == in_place) && aligned && detail::host_is_little_endian()) {
      w = Weight<T>::view(in_place, t.shape[0], t.shape[1], st.bytes(name), st.keep_alive());
      if (map) return w;
      w = w.owned_copy();
    } else {
      w = Weight<T>(st.template matrix<T>(name), storage.value_or(Storage::Native));
    }
    st.release(name);
    return w;
  }

 private:
  explicit Checkpoint(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& what) const { throw format_error("checkpoint " + path_ + ": " + what); }

  // Whether p exists; a failure to tell (a loop of symbolic links, a name too long for the file
  // system) is a format_error, not std::filesystem's exception.
  bool exists(const std::filesystem::path& p) const {
    std::error_code ec;
    const bool there = std::filesystem::exists(p, ec);
    if (ec) fail(p.filename().string() + " cannot be read: " + ec.message());
    return there;
  }

  // A JSON file of the directory, with the checks a safetensors header gets: anything but a
  // regular file is refused before it is read (detail::FileBytes), a NUL byte is invalid JSON,
  // and nesting past detail::max_header_depth is refused before a document is built (nlohmann
  // destroys and prints documents recursively: 30,000 levels overflowed the stack).
  nlohmann::json read_json(const std::filesystem::path& file) const {
    const std::string name = file.filename().string();
    const detail::FileBytes bytes(file.string(), FileAccess::Read, "checkpoint " + path_ + ": " + name);
    const char* text = reinterpret_cast<const char*>(bytes.data());
    const std::size_t size = bytes.size();
    if (const void* nul = size ? std::memchr(text, 0, size) : nullptr)
      fail(attn::detail::concat(name, " is not valid JSON: it holds a NUL byte at offset ",
                                static_cast<const char*>(nul) - text));
    detail::HeaderScan scan;
    const bool valid = nlohmann::json::sax_parse(text, text + size, &scan);
    if (scan.too_deep)
      fail(attn::detail::concat(name, " nests arrays and objects deeper than ", detail::max_header_depth, " levels"));
    if (!valid) fail(name + " is not valid JSON: " + scan.error);
    try {
      return nlohmann::json::parse(text, text + size);
    } catch (const nlohmann::json::exception& e) {  // not after the scan, but never unchecked
      fail(name + " is not valid JSON: " + e.what());
    }
  }

  void add_shard(const std::filesystem::path& file, const std::map<std::string, std::string>* listed) {
    const std::size_t i = shards_.size();
    shards_.push_back(SafeTensors::open(file, access_));
    const std::string base = file.filename().string();
    for (const std::string& name : shards_[i].names()) {
      if (listed) {
        const auto it = listed->find(name);
        if (it == listed->end())
          fail(attn::detail::concat("shard ", base, " holds \"", name,
                                    "\", which model.safetensors.index.json does not list"));
        if (it->second != base)
          fail(attn::detail::concat("shard ", base, " holds \"", name, "\", which the index puts in ", it->second));
      }
      if (!where_.emplace(name, i).second)
        fail(attn::detail::concat("tensor \"", name, "\" is in two shards: ", shards_[where_[name]].path(), " and ",
                                  base));
      names_.push_back(name);
    }
  }

  void open_shards(const std::filesystem::path& dir, const std::filesystem::path& index_file) {
    const nlohmann::json index = read_json(index_file);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      fail("model.safetensors.index.json has no \"weight_map\" object");
    std::map<std::string, std::string> listed;
    std::vector<std::string> files;  // in the order the index first names them
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) fail("model.safetensors.index.json maps \"" + name + "\" to " + file.dump());
      const std::string f = file.get<std::string>();
      // A shard is a file in this directory: no path separators, no "..".
      if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." || f == "..")
        fail("model.safetensors.index.json names shard \"" + f + "\", not a file name in the directory");
      if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
      listed.emplace(name, f);
    }
    std::sort(files.begin(), files.end());  // model-00001-of-N, model-00002-of-N, ...
    for (const std::string& f : files) {
      if (!exists(dir / f)) fail("shard " + f + " named by model.safetensors.index.json is missing");
      add_shard(dir / f, &listed);
    }
    for (const auto& [name, file] : listed)
      if (!where_.count(name))
        fail(attn::detail::concat("the index puts \"", name, "\" in ", file, ", which does not hold it"));
  }

  std::string path_;
  FileAccess access_ = FileAccess::Map;
  nlohmann::json config_;
  std::vector<SafeTensors> shards_;
  std::vector<std::string> names_;
  std::unordered_map<std::string, std::size_t> where_;  // name -> index in shards_
};

// A tensor a model expects: its full name in the checkpoint, and its shape.
struct ExpectedTensor {
  std::string name;
  TensorShape shape;
};

// Checks a checkpoint against the tensors a model expects: every one there with its shape, and
// (strict) no other tensor, except those whose names end in one of `ignored` (buffers some writers
// save beside the parameters: GPT-2's "attn.bias", Llama's "rotary_emb.inv_freq"). A shape that
// differs is a shape_error. A missing tensor is a format_error listing every one (a model built
// from a checkpoint has no other values for it); unexpected ones are too when strict, else they
// are returned in the LoadResult. `prefix` is where the model's base sits ("model.", "bert.", or
// ""): when every missing tensor under it exists under another prefix, the message names that one.
// `where` names the caller.
inline LoadResult check_tensors(const Checkpoint& ckpt, const std::vector<ExpectedTensor>& expected,
                                const std::string& prefix, bool strict, const std::vector<std::string>& ignored,
                                const std::string& where) {
  const auto ends_with = [](const std::string& s, const std::string& end) {
    return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  };
  const auto starts_with = [](const std::string& s, const std::string& start) { return s.rfind(start, 0) == 0; };
  LoadResult r;
  std::unordered_map<std::string, bool> wanted;
  std::string mismatches;
  for (const ExpectedTensor& e : expected) {
    wanted.emplace(e.name, true);
    if (!ckpt.contains(e.name)) {
      r.missing_keys.push_back(e.name);
      continue;
    }
    const TensorShape& have = ckpt.info(e.name).shape;
    if (have != e.shape)
      mismatches += (mismatches.empty() ? "\"" : "; \"") + e.name + "\" has shape " + to_string(have) +
                    ", the model's is " + to_string(e.shape);
  }
  for (const std::string& name : ckpt.names()) {
    if (wanted.count(name)) continue;
    bool skip = false;
    for (const std::string& end : ignored) skip = skip || ends_with(name, end);
    if (!skip) r.unexpected_keys.push_back(name);
  }
  if (!mismatches.empty())
    throw shape_error(where + ": checkpoint " + ckpt.path() + ": " + mismatches + " (check config.json)");
  if (r.missing_keys.empty() && (!strict || r.unexpected_keys.empty())) return r;

  const auto list = [](const std::vector<std::string>& keys) {
    std::string s;
    for (std::size_t i = 0; i < keys.size() && i < 8; ++i) s += (i ? ", \"" : "\"") + keys[i] + "\"";
    if (keys.size() > 8) s += ", and " + std::to_string(keys.size() - 8) + " more";
    return s;
  };
  std::string msg = where + ": checkpoint " + ckpt.path() + ":";
  if (!r.missing_keys.empty())
    msg += " " + std::to_string(r.missing_keys.size()) + " missing tensors [" + list(r.missing_keys) + "]";
  if (!r.unexpected_keys.empty())
    msg += std::string(r.missing_keys.empty() ? "" : ";") + " " + std::to_string(r.unexpected_keys.size()) +
           " unexpected tensors [" + list(r.unexpected_keys) + "]";
  // A prefix that explains the missing ones: every missing name under `prefix` exists under it instead.
  std::vector<std::string> base;  // the missing names, less the prefix
  for (const std::string& m : r.missing_keys)
    if (starts_with(m, prefix)) base.push_back(m.substr(prefix.size()));
  if (!base.empty()) {
    for (const std::string& name : ckpt.names()) {
      if (!ends_with(name, base.front())) continue;
      const std::string q = name.substr(0, name.size() - base.front().size());
      if (q == prefix || (!q.empty() && q.back() != '.')) continue;
      bool all = true;
      for (const std::string& m : base) all = all && ckpt.contains(q + m);
      if (all) {
        msg += attn::detail::concat("; the missing tensors are all under the prefix \"", q, "\" instead of \"", prefix,
                                    "\"");
        break;
      }
    }
  }
  throw format_error(msg + (r.missing_keys.empty() ? " (strict = false ignores them)" : ""));
}

}  // namespace attn::io
