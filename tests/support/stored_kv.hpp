// tests/support/stored_kv.hpp - K or V as it looks after travelling in a storage type: each row of
// each head stored (store_row) and read back (dequantize), as attn/dist's blocks and KV caches keep
// them. The reference side of the storage tests in tests/dist/.
#pragma once

#include <vector>

#include "attn/detail/storage.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn_test {

// x [rows, heads*w]  ->  the same shape, each head's row of w elements as storage st holds it.
template <class T>
attn::Matrix<T> stored_as(const attn::Matrix<T>& x, attn::Index heads, attn::Storage st) {
  const attn::Index w = x.cols() / heads;
  attn::Matrix<T> y(x.rows(), x.cols());
  attn::detail::with_storage<T>(st, [&](auto tag) {
    using S = typename decltype(tag)::type;
    std::vector<S> buf(static_cast<std::size_t>(w));
    for (attn::Index r = 0; r < x.rows(); ++r)
      for (attn::Index h = 0; h < heads; ++h) {
        const T sc = attn::detail::store_row<S>(x.data() + r * x.cols() + h * w, w, buf.data());
        attn::detail::dequantize(buf.data(), w, sc, y.data() + r * y.cols() + h * w);
      }
  });
  return y;
}

}  // namespace attn_test
