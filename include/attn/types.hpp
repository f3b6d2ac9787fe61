// attn/types.hpp - the matrix types every attn interface speaks.
//
// One token per row, row-major: a sequence is [L, E], and a contiguous PyTorch or numpy
// [B, L, E] buffer is a [B*L, E] matrix, so it can be wrapped with Eigen::Map and passed
// to any attn function without a copy:
//
//   Eigen::Map<const attn::Matrix<float>> x(tensor.data_ptr<float>(), B * L, E);
#pragma once

#include <type_traits>

#include "attn/detail/eigen.hpp"

namespace attn {

using Index = Eigen::Index;

// The scalar types attn computes in. Every class template checks its T against this, so another
// type (Eigen::half, Eigen::bfloat16, int) is one clear error at the user's line, not a cascade
// from inside the kernels.
template <class T>
inline constexpr bool is_supported_scalar = std::is_same_v<T, float> || std::is_same_v<T, double>;
#define ATTN_CHECK_SCALAR(T)                                                                                   \
  static_assert(::attn::is_supported_scalar<T>,                                                                \
                "attn computes in float or double only: use attn::<class><float> or <double> (16-bit weights " \
                "and caches are converted to float on load)")

// With ATTN_EXTERN_TEMPLATES (attn/instantiate.hpp), each module's header ends with
// ATTN_DETAIL_EXTERN_MODULE(Module) at global scope: the float and double members are declared
// extern there, so a file compiles none of them whichever headers it includes, and
// attn/instantiate.hpp compiles them once per program. Without it, nothing.
#ifdef ATTN_EXTERN_TEMPLATES
#define ATTN_DETAIL_EXTERN_MODULE(Module)    \
  extern template class attn::Module<float>; \
  extern template class attn::Module<double>
#else
#define ATTN_DETAIL_EXTERN_MODULE(Module) static_assert(true, "")
#endif

// [rows, cols], row-major: one token per row.
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// [n]: biases and other per-feature parameters.
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// Read-only inputs: any row-major matrix, block or Map with unit inner stride binds without a
// copy (a column-major argument is copied into a temporary by Eigen).
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;
template <class T>
using ConstVectorRef = Eigen::Ref<const Vector<T>>;

// Outputs the caller has sized.
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;

using BoolMatrix = Matrix<bool>;

// [n] positions, offsets or sizes.
using IndexVector = Eigen::Matrix<Index, Eigen::Dynamic, 1>;

}  // namespace attn

namespace attn {

// What the *_with_weights calls return; works with structured bindings:
//   auto [out, weights] = mha.forward(x, x, x, args);
template <class T>
struct AttentionResult {
  Matrix<T> output;
  Matrix<T> weights;  // attention probabilities; 0 x 0 when they were not asked for
};

// The output and each row's log-sum-exp (forward_with_lse): lse [H, N] for N query rows,
// FlashAttention's layout, what attn::merge_attention_states takes.
template <class T>
struct AttentionLse {
  Matrix<T> output;
  Matrix<T> lse;
};

}  // namespace attn
