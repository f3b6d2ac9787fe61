// attn/detail/check.hpp - argument checks at the public boundary, and internal asserts.
#pragma once

#include <sstream>
#include <string>

#include <Eigen/Core>

#include "attn/error.hpp"

// Internal invariants (never a caller's mistake): compiled out under NDEBUG, like eigen_assert.
#define ATTN_ASSERT(cond) eigen_assert(cond)

namespace attn::detail {

// "[3, 4]": the shape notation used in every message.
inline std::string shape_str(Eigen::Index rows, Eigen::Index cols) {
  std::ostringstream s;
  s << '[' << rows << ", " << cols << ']';
  return s.str();
}

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

// Throws shape_error "<where>: <message parts...>" unless ok.
template <class... Parts>
void require_shape(bool ok, const char* where, const Parts&... parts) {
  if (!ok) throw shape_error(concat(where, ": ", parts...));
}

template <class... Parts>
void require_arg(bool ok, const char* where, const Parts&... parts) {
  if (!ok) throw argument_error(concat(where, ": ", parts...));
}

// The common check: `name` must be [rows, cols]; a negative expected dimension matches any size.
// `expected` says in words what the dimensions mean, e.g. "[L, d] = [?, 64]".
inline void require_dims(const char* where, const char* name, Eigen::Index rows, Eigen::Index cols,
                         Eigen::Index want_rows, Eigen::Index want_cols, const std::string& meaning) {
  const bool ok = (want_rows < 0 || rows == want_rows) && (want_cols < 0 || cols == want_cols);
  require_shape(ok, where, name, " has shape ", shape_str(rows, cols), ", expected ", meaning);
}

// The same for a vector: `name` must have `want` elements.
inline void require_len(const char* where, const char* name, Eigen::Index n, Eigen::Index want,
                        const std::string& meaning) {
  require_shape(n == want, where, name, " has shape [", n, "], expected ", meaning);
}

}  // namespace attn::detail
