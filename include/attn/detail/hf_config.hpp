// attn/detail/hf_config.hpp - typed reads of a Hugging Face config.json, for attn/models/: each
// missing or ill-typed field is a format_error naming the checkpoint and the field.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "attn/error.hpp"
#include "attn/types.hpp"

namespace attn::detail {

class HfConfig {
 public:
  HfConfig(const nlohmann::json& json, std::string path) : j_(json), path_(std::move(path)) {}

  // Present and not null.
  bool has(const char* key) const { return j_.is_object() && j_.contains(key) && !j_[key].is_null(); }
  const nlohmann::json& at(const char* key) const {
    if (!has(key)) fail(std::string("has no \"") + key + "\"");
    return j_[key];
  }

  // A positive integer (a count or a size); required, or `fallback` when absent or null.
  Index count(const char* key) const {
    const nlohmann::json& v = at(key);
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0 ||
        v.get<std::int64_t>() > std::int64_t(std::numeric_limits<int>::max()))
      fail(std::string("\"") + key + "\" is " + v.dump() + ", expected a positive integer");
    return static_cast<Index>(v.get<std::int64_t>());
  }
  Index count(const char* key, Index fallback) const { return has(key) ? count(key) : fallback; }
  // A layer count: a count no larger than the checkpoint's number of tensors (every layer has
  // several), checked before a list of each layer's tensors is built for it.
  Index layers(const char* key, std::size_t tensors) const {
    const Index n = count(key);
    if (static_cast<std::uint64_t>(n) > tensors)
      fail(std::string("\"") + key + "\" is " + std::to_string(n) + ", but the checkpoint holds only " +
           std::to_string(tensors) + " tensors (every layer has several)");
    return n;
  }
  // An integer that may be negative or zero (a token id).
  Index integer(const char* key, Index fallback) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_[key];
    if (!v.is_number_integer()) fail(std::string("\"") + key + "\" is " + v.dump() + ", expected an integer");
    return static_cast<Index>(v.get<std::int64_t>());
  }
  double real(const char* key) const {
    const nlohmann::json& v = at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      fail(std::string("\"") + key + "\" is " + v.dump() + ", expected a finite number");
    return v.get<double>();
  }
  double real(const char* key, double fallback) const { return has(key) ? real(key) : fallback; }
  bool flag(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_[key];
    if (!v.is_boolean()) fail(std::string("\"") + key + "\" is " + v.dump() + ", expected true or false");
    return v.get<bool>();
  }
  std::string text(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const nlohmann::json& v = j_[key];
    if (!v.is_string()) fail(std::string("\"") + key + "\" is " + v.dump() + ", expected a string");
    return v.get<std::string>();
  }
  // A nested object (rope_scaling) as a config of its own.
  HfConfig object(const char* key) const {
    const nlohmann::json& v = at(key);
    if (!v.is_object()) fail(std::string("\"") + key + "\" is " + v.dump() + ", expected an object");
    return HfConfig(v, path_ + ": \"" + key + "\"");
  }

  [[noreturn]] void fail(const std::string& what) const { throw format_error(path_ + ": " + what); }

 private:
  const nlohmann::json& j_;
  std::string path_;
};

}  // namespace attn::detail
