// attn/detail/check.hpp - argument checks at the public boundary, and internal asserts.
#pragma once

#include "attn/detail/eigen.hpp"
#include <ostream>
#include <sstream>
#include <string>

#include "attn/error.hpp"

// Internal invariants (never a caller's mistake): compiled out under NDEBUG, like eigen_assert.
#define ATTN_ASSERT(cond) eigen_assert(cond)

namespace attn::detail {

// A shape as it appears in every message: "[3, 4]". A plain pair, so passing one to a check
// costs nothing until a message is actually written.
struct Shape {
  Eigen::Index rows, cols;
};
inline std::ostream& operator<<(std::ostream& s, Shape x) { return s << '[' << x.rows << ", " << x.cols << ']'; }
inline Shape shape(Eigen::Index rows, Eigen::Index cols) { return {rows, cols}; }

// A message from its parts, each written as `std::ostream << part` writes it. Text goes straight
// into the string; any other part (numbers, shapes) through one ostringstream per part type, so
// that each of the dozens of concat<...> a translation unit instantiates (one per list of part
// types) is a few calls, not a stream of its own to compile.
template <class Part>
void append_part(std::string& out, const Part& part) {
  std::ostringstream s;
  s << part;
  out += s.str();
}
inline void append_part(std::string& out, const char* text) { out += text; }
inline void append_part(std::string& out, const std::string& text) { out += text; }

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}

// The checks below build their message only when they fail: on the success path they are a
// comparison or two, whatever the message says.

// Throws shape_error "<where>: <message parts...>" unless ok.
template <class... Parts>
void require_shape(bool ok, const char* where, const Parts&... parts) {
  if (!ok) throw shape_error(concat(where, ": ", parts...));
}

template <class... Parts>
void require_arg(bool ok, const char* where, const Parts&... parts) {
  if (!ok) throw argument_error(concat(where, ": ", parts...));
}

// The common check: `name` must be [want_rows, want_cols]; a negative expected dimension matches
// any size. `expected` says in words what the dimensions mean, e.g. "[L, d] = [?, 64]".
template <class... Expected>
void require_dims(const char* where, const char* name, Eigen::Index rows, Eigen::Index cols, Eigen::Index want_rows,
                  Eigen::Index want_cols, const Expected&... expected) {
  const bool ok = (want_rows < 0 || rows == want_rows) && (want_cols < 0 || cols == want_cols);
  require_shape(ok, where, name, " has shape ", shape(rows, cols), ", expected ", expected...);
}

// a * b for dimensions a, b >= 0, or a shape_error "<where>: <what> = a * b overflows the index
// type" when the product does not fit in Eigen::Index: a size computed from a caller's dimensions
// (heads * head_dim, rows * cols of a buffer) must never wrap around into a small or negative one.
inline Eigen::Index checked_mul(const char* where, const char* what, Eigen::Index a, Eigen::Index b) {
  ATTN_ASSERT(a >= 0 && b >= 0);
  require_shape(a == 0 || b <= Eigen::NumTraits<Eigen::Index>::highest() / a, where, what, " = ", a, " * ", b,
                " overflows the index type");
  return a * b;
}

// B, the number of sequences stacked in the rows of a [B*L, ...] input. The batched entry points
// take it from their arguments, whose `batch` is 0 ("not set") until the caller sets it: a batch
// mistaken for one long sequence would mix the sequences and still return plausible numbers.
inline void require_batch(Eigen::Index B, const char* where) {
  require_arg(B != 0, where,
              "batch is not set: set args.batch = B, the number of sequences stacked in the rows of the "
              "[B*L, ...] input (1 for a single sequence)");
  require_shape(B > 0, where, "batch must be positive, got ", B);
}

// The same for a vector: `name` must have `want` elements.
template <class... Expected>
void require_len(const char* where, const char* name, Eigen::Index n, Eigen::Index want, const Expected&... expected) {
  require_shape(n == want, where, name, " has shape [", n, "], expected ", expected...);
}

}  // namespace attn::detail
