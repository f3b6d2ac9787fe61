// attn/swiglu.hpp - the gated feed-forward block of Llama, Mistral and Qwen (Hugging Face's
// LlamaMLP): down_proj(silu(gate_proj(x)) * up_proj(x)).
//
//   attn::SwiGLU<float> mlp(/*d_model=*/512, /*ffn_dim=*/1376);
//   mlp.gate_proj().set_weight(wg);  mlp.up_proj().set_weight(wu);  // [1376, 512] each
//   mlp.down_proj().set_weight(wd);                                  // [512, 1376]
//   attn::Matrix<float> y = mlp.forward(x);                          // x: [N, 512] -> y: [N, 512]
//
// silu(g) = g * sigmoid(g) = g / (1 + exp(-g)) (F.silu). The product silu(gate) * up is the gate:
// each of the ffn_dim hidden features is the up projection scaled by a smooth on/off of its own
// gate projection (Shazeer 2020, "GLU Variants Improve Transformer").
#pragma once

#include <utility>

#include "attn/detail/check.hpp"
#include "attn/detail/scratch.hpp"
#include "attn/init.hpp"
#include "attn/linear.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"

namespace attn {

template <class T>
class SwiGLU {
  ATTN_CHECK_SCALAR(T);

 public:
  // gate_proj, up_proj: [d_model -> ffn_dim], down_proj: [ffn_dim -> d_model], with nn.Linear's
  // initialisation, drawn in that order; bias = false as in Llama (mlp_bias = false).
  SwiGLU(Index d_model, Index ffn_dim, bool bias, Generator& gen)
      : gate_proj_(checked(d_model, ffn_dim), ffn_dim, bias, gen),
        up_proj_(d_model, ffn_dim, bias, gen),
        down_proj_(ffn_dim, d_model, bias, gen) {}
  SwiGLU(Index d_model, Index ffn_dim, bool bias = false) : SwiGLU(d_model, ffn_dim, bias, default_gen()) {}
  // From its three projections (no initialisation): gate_proj and up_proj [d_model -> ffn_dim],
  // down_proj [ffn_dim -> d_model].
  SwiGLU(Linear<T> gate_proj, Linear<T> up_proj, Linear<T> down_proj)
      : gate_proj_(std::move(gate_proj)), up_proj_(std::move(up_proj)), down_proj_(std::move(down_proj)) {
    const Index D = gate_proj_.in_features(), F = gate_proj_.out_features();
    detail::require_shape(up_proj_.in_features() == D && up_proj_.out_features() == F &&
                              down_proj_.in_features() == F && down_proj_.out_features() == D,
                          "attn::SwiGLU", "gate_proj maps ", D, " -> ", F, " features, up_proj ", up_proj_.in_features(),
                          " -> ", up_proj_.out_features(), ", down_proj ", down_proj_.in_features(), " -> ",
                          down_proj_.out_features(), "; expected d_model -> ffn_dim twice and ffn_dim -> d_model");
  }

  // x: [N, d_model]  ->  [N, d_model]
  Matrix<T> forward(const ConstMatrixRef<T>& x) const {
    Matrix<T> y(x.rows(), d_model());
    run(x, y, "attn::SwiGLU::forward");
    return y;
  }

  // x: [N, d_model]  ->  y [N, d_model], sized by the caller; y may be x itself (x is read in full
  // before y is written). The two hidden [N, ffn_dim] projections live in the per-thread scratch
  // buffer (detail/scratch.hpp), so a repeated call of one shape allocates nothing.
  void forward_into(const ConstMatrixRef<T>& x, MatrixRef<T> y) const { run(x, y, "attn::SwiGLU::forward_into"); }

  Index d_model() const { return gate_proj_.in_features(); }
  Index ffn_dim() const { return gate_proj_.out_features(); }
  bool has_bias() const { return gate_proj_.has_bias(); }

  // The three projections, by Hugging Face's names (gate_proj.weight [ffn_dim, d_model],
  // up_proj.weight [ffn_dim, d_model], down_proj.weight [d_model, ffn_dim]; .bias with bias).
  const Linear<T>& gate_proj() const { return gate_proj_; }
  Linear<T>& gate_proj() { return gate_proj_; }
  const Linear<T>& up_proj() const { return up_proj_; }
  Linear<T>& up_proj() { return up_proj_; }
  const Linear<T>& down_proj() const { return down_proj_; }
  Linear<T>& down_proj() { return down_proj_; }
  // Keeps the three weights in storage s (attn/storage.hpp); all or none changes.
  void set_weight_storage(Storage s) { detail::set_storage_of_all<T, 3>(s, {&gate_proj_, &up_proj_, &down_proj_}); }
  // The arithmetic of the three products (attn/precision.hpp): Native (in T) or BFloat16.
  void set_precision(Precision p) {
    for (Linear<T>* l : {&gate_proj_, &up_proj_, &down_proj_}) l->set_precision(p);
  }
  Precision precision() const { return gate_proj_.precision(); }

 private:
  static Index checked(Index d_model, Index ffn_dim) {
    detail::require_shape(d_model > 0 && ffn_dim > 0, "attn::SwiGLU",
                          "d_model and ffn_dim must be positive, got d_model = ", d_model, ", ffn_dim = ", ffn_dim);
    return d_model;
  }

  void run(const ConstMatrixRef<T>& x, MatrixRef<T> y, const char* where) const {
    const Index D = d_model(), F = ffn_dim(), N = x.rows();
    detail::require_dims(where, "x", x.rows(), x.cols(), -1, D, "[N, d_model] = [N, ", D, "]");
    detail::require_dims(where, "y", y.rows(), y.cols(), N, D, "[N, d_model] = ", detail::shape(N, D));
    detail::Scratch<T> scratch(2 * N * F);
    Eigen::Map<Matrix<T>> gate(scratch.data(), N, F), up(scratch.data() + N * F, N, F);
    gate_proj_.forward_into(x, gate);
    up_proj_.forward_into(x, up);
    // silu(g) * u = g / (1 + exp(-g)) * u, vectorised by Eigen's packet exp. For a large negative
    // finite g, exp(-g) overflows to inf and g / inf = -0, silu's limit, not a NaN.
    gate.array() = gate.array() / (T(1) + (-gate.array()).exp()) * up.array();
    down_proj_.forward_into(gate, y);
  }

  static Generator& default_gen() {
    thread_local Generator gen;
    return gen;
  }

  Linear<T> gate_proj_, up_proj_, down_proj_;
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(SwiGLU);
