// attn/dist/sharding.hpp - how context parallelism splits one sequence over P ranks, and the
// block pairs each rank computes. No MPI here: this is the arithmetic every rank agrees on.
//
// A sequence of L positions is cut into chunks; rank r holds the rows of its chunks, in position
// order, as its local rows:
//   Contiguous  P chunks; rank r holds chunk r.                     (ring attention)
//   ZigZag      2P chunks; rank r holds chunks r and 2P-1-r.        (load-balanced causal ring
//               attention: under causal masking every rank has the same work, one early and one
//               late chunk, where Contiguous gives the last rank P times the first's)
// Chunk c of n covers positions [c*L/n, (c+1)*L/n) (integer division): sizes differ by at most 1.
//
//   attn::dist::Sharding sh(/*seq_len=*/4096, /*ranks=*/4, attn::dist::Layout::ZigZag);
//   attn::Matrix<float> q_local = sh.shard<float>(q, /*batch=*/1, rank);   // [1024, H*d]
//   attn::Matrix<float> out = sh.unshard<float>(outs, /*batch=*/1);        // every rank's, in rank order
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/types.hpp"

namespace attn::dist {

enum class Layout { Contiguous, ZigZag };

inline const char* layout_name(Layout l) { return l == Layout::ZigZag ? "ZigZag" : "Contiguous"; }

// A run of consecutive positions a rank holds: positions [start, start + length) of the sequence
// are its local rows [local, local + length).
struct Segment {
  Index start = 0, length = 0, local = 0;
};

class Sharding {
 public:
  // seq_len >= 1 positions over ranks >= 1 (a rank may hold no rows when seq_len is small).
  Sharding(Index seq_len, int ranks, Layout layout) : L_(seq_len), P_(ranks), layout_(layout) {
    const char* where = "attn::dist::Sharding";
    attn::detail::require_shape(seq_len >= 1, where, "seq_len must be >= 1, got ", seq_len);
    attn::detail::require_shape(ranks >= 1, where, "ranks must be >= 1, got ", ranks);
    attn::detail::require_arg(layout == Layout::Contiguous || layout == Layout::ZigZag, where, "unknown layout");
    attn::detail::checked_mul(where, "seq_len * 2 * ranks", seq_len, attn::detail::checked_mul(where, "2 * ranks", 2, ranks));
  }

  Index seq_len() const { return L_; }
  int ranks() const { return P_; }
  Layout layout() const { return layout_; }

  // Rank r's segments in local row order: one (Contiguous) or two (ZigZag; either may be empty).
  std::vector<Segment> segments(int rank) const {
    check_rank(rank, "attn::dist::Sharding::segments");
    std::vector<Segment> s;
    if (layout_ == Layout::Contiguous) {
      s.push_back(chunk(rank, P_, 0));
    } else {
      s.push_back(chunk(rank, Index(2) * P_, 0));
      s.push_back(chunk(Index(2) * P_ - 1 - rank, Index(2) * P_, s[0].length));
    }
    return s;
  }

  // The number of rows rank r holds (per sequence).
  Index local_len(int rank) const {
    Index n = 0;
    for (const Segment& s : segments(rank)) n += s.length;
    return n;
  }

  // Rank r's rows of x [batch*L, C] (rows (b, l), batch first)  ->  [batch*local_len(r), C], rows
  // (b, local row). Also for a mask's rows: a [B*H*L, S] mask is batch = B*H.
  template <class T>
  Matrix<T> shard(const ConstMatrixRef<T>& x, Index batch, int rank) const {
    const char* where = "attn::dist::Sharding::shard";
    check_rank(rank, where);
    check_rows(where, "x", x.rows(), batch);
    const Index n = local_len(rank);
    Matrix<T> y(batch * n, x.cols());
    for (Index b = 0; b < batch; ++b)
      for (const Segment& s : segments(rank))
        if (s.length > 0) y.middleRows(b * n + s.local, s.length) = x.middleRows(b * L_ + s.start, s.length);
    return y;
  }

  // The inverse: parts[r] = rank r's rows [batch*local_len(r), C]  ->  [batch*L, C].
  template <class T>
  Matrix<T> unshard(const std::vector<Matrix<T>>& parts, Index batch) const {
    const char* where = "attn::dist::Sharding::unshard";
    attn::detail::require_shape(Index(parts.size()) == P_, where, "parts has ", parts.size(), " entries, expected one per rank (",
                          P_, ")");
    attn::detail::require_batch(batch, where);
    const Index C = parts[0].cols();
    for (int r = 0; r < P_; ++r)
      attn::detail::require_dims(where, "parts[r]", parts[std::size_t(r)].rows(), parts[std::size_t(r)].cols(), batch * local_len(r), C,
                           "[batch*local_len(r), C] = ", attn::detail::shape(batch * local_len(r), C), " for r = ", r);
    Matrix<T> x(batch * L_, C);
    for (int r = 0; r < P_; ++r) {
      const Index n = local_len(r);
      for (Index b = 0; b < batch; ++b)
        for (const Segment& s : segments(r))
          if (s.length > 0) x.middleRows(b * L_ + s.start, s.length) = parts[std::size_t(r)].middleRows(b * n + s.local, s.length);
    }
    return x;
  }

  // Columns of a key padding mask [batch, L] that rank r's keys cover  ->  [batch, local_len(r)].
  template <class T>
  Matrix<T> shard_columns(const ConstMatrixRef<T>& x, int rank) const {
    const char* where = "attn::dist::Sharding::shard_columns";
    check_rank(rank, where);
    attn::detail::require_dims(where, "x", x.rows(), x.cols(), -1, L_, "[rows, L] = [rows, ", L_, "]");
    Matrix<T> y(x.rows(), local_len(rank));
    if (y.size() == 0) return y;  // no rows: x's data may be null, and no column is offset into it
    for (const Segment& s : segments(rank))
      if (s.length > 0) y.middleCols(s.local, s.length) = x.middleCols(s.start, s.length);
    return y;
  }

 private:
  // Chunk c of n, at local row `local`.
  Segment chunk(Index c, Index n, Index local) const {
    const Index a = c * L_ / n, b = (c + 1) * L_ / n;
    return {a, b - a, local};
  }
  void check_rank(int rank, const char* where) const {
    attn::detail::require_arg(rank >= 0 && rank < P_, where, "rank ", rank, " is outside [0, ranks) = [0, ", P_, ")");
  }
  void check_rows(const char* where, const char* name, Index rows, Index batch) const {
    attn::detail::require_batch(batch, where);
    attn::detail::require_shape(rows == attn::detail::checked_mul(where, "batch * seq_len", batch, L_), where, name, " has ", rows,
                          " rows, expected batch * seq_len = ", batch, " * ", L_);
  }

  Index L_;
  int P_;
  Layout layout_;
};

}  // namespace attn::dist
