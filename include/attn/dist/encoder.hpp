// attn/dist/encoder.hpp - a TransformerEncoder (nn.TransformerEncoder, BERT's encoder) over a
// sequence split across MPI ranks: the self-attention runs context-parallel
// (attn/dist/context_parallel.hpp); everything else - in_proj, out_proj, the LayerNorms, the
// feed-forward, the residuals - acts on each row alone, so each rank runs it on its own rows.
//
//   attn::dist::ContextParallelEncoder<float> enc(MPI_COMM_WORLD, std::move(encoder));
//   attn::dist::Sharding sh = enc.sharding(L);                      // ZigZag by default
//   attn::dist::ContextArgs<float> args;  args.batch = B;           // + key padding [B, n], causal, ...
//   attn::Matrix<float> y = enc.forward(sh.shard<float>(src, B, enc.rank()), args);   // [B*n, d_model]
//
// The rows are (b, local row), batch first, whatever the encoder's batch_first (which only orders
// a single process's rows). Masks as ContextParallelAttention's: key_padding_mask [B, n] the
// rank's keys, attn_mask [n, L] or [B*H*n, L] its query rows; every layer uses the same ones.
// Equals the encoder's forward over the whole sequence up to rounding.
#pragma once

#include <mpi.h>

#include <utility>

#include "attn/dist/context_parallel.hpp"
#include "attn/transformer.hpp"

namespace attn::dist {

template <class T>
class ContextParallelEncoder {
  ATTN_CHECK_SCALAR(T);

 public:
  // Collective over comm. Takes the encoder (std::move it in to keep one copy of the weights).
  ContextParallelEncoder(MPI_Comm comm, TransformerEncoder<T> encoder)
      : encoder_(std::move(encoder)),
        attention_(comm, encoder_.num_layers() > 0 ? encoder_.layer(0).nhead() : 1,
                   encoder_.num_layers() > 0 ? encoder_.layer(0).nhead() : 1) {}

  int rank() const { return attention_.rank(); }
  int ranks() const { return attention_.ranks(); }
  Sharding sharding(Index seq_len, Layout layout = Layout::ZigZag) const {
    return attention_.sharding(seq_len, layout);
  }
  const TransformerEncoder<T>& encoder() const { return encoder_; }

  // src [B*n, d_model]: this rank's n rows of each sequence  ->  [B*n, d_model]
  Matrix<T> forward(const ConstMatrixRef<T>& src, const ContextArgs<T>& args) const {
    const char* where = "attn::dist::ContextParallelEncoder::forward";
    Matrix<T> x;
    detail::agree(attention_.comm(), [&] {
      attn::detail::require_batch(args.batch, where);
      attn::detail::require_shape(src.cols() == encoder_.d_model() && src.rows() % args.batch == 0, where,
                                  "src has shape ", attn::detail::shape(src.rows(), src.cols()),
                                  ", expected [B*n, d_model] = [", args.batch, "*n, ", encoder_.d_model(), "]");
      x = src;
    });
    const Index N = x.rows(), E = encoder_.d_model();
    Matrix<T> t(N, E), u(N, E), qkv(N, 3 * E), heads(N, E);
    for (Index i = 0; i < encoder_.num_layers(); ++i) {
      const TransformerEncoderLayer<T>& layer = encoder_.layer(i);
      const auto attend = [&](const Matrix<T>& in, MatrixRef<T> y) {
        const MultiHeadAttention<T>& mha = layer.self_attn();
        mha.in_proj_into(in, qkv);
        ContextArgs<T> a = args;
        if (!a.precision) a.precision = mha.precision();
        attention_.forward_into(qkv.leftCols(E), qkv.middleCols(E, E), qkv.rightCols(E), a, heads);
        mha.out_proj().forward_into(heads, y);
      };
      if (layer.options().norm_first) {
        layer.norm1().forward_into(x, t);
        attend(t, u);
        x += u;
        layer.norm2().forward_into(x, t);
        layer.feed_forward().forward_into(t, u);
        x += u;
      } else {
        attend(x, u);
        x += u;
        layer.norm1().forward_into(x, x);
        layer.feed_forward().forward_into(x, u);
        x += u;
        layer.norm2().forward_into(x, x);
      }
    }
    if (encoder_.norm()) encoder_.norm()->forward_into(x, x);
    return x;
  }

 private:
  TransformerEncoder<T> encoder_;
  ContextParallelAttention<T> attention_;
};

}  // namespace attn::dist
