// tests/support/state_dict_compare.hpp - bitwise comparison of two state dicts.
#pragma once

#include <gtest/gtest.h>

#include <cstring>

#include "attn/io/state_dict.hpp"

namespace attn_test {

// Same keys in the same order, same shapes, same bytes.
template <class T>
::testing::AssertionResult identical(const attn::io::StateDict<T>& a, const attn::io::StateDict<T>& b) {
  if (a.names() != b.names()) return ::testing::AssertionFailure() << "different keys";
  for (const auto& [name, t] : a) {
    const attn::io::Tensor<T>& u = b.at(name);
    if (t.shape() != u.shape()) return ::testing::AssertionFailure() << name << ": different shapes";
    if (t.numel() && std::memcmp(t.data(), u.data(), sizeof(T) * static_cast<std::size_t>(t.numel())) != 0)
      return ::testing::AssertionFailure() << name << ": different bytes";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace attn_test
