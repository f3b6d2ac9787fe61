// attn/embedding.hpp - torch.nn.Embedding (eval mode): a table of num_embeddings rows, one per
// token id, looked up row by row.
//
//   attn::Embedding<float> wte(/*num_embeddings=*/50257, /*embedding_dim=*/768);
//   wte.set_weight(w);                                  // [50257, 768], PyTorch's wte.weight
//   attn::Matrix<float> x = wte.forward({15496, 11});   // token ids -> [2, 768]
//
// The table can be kept in bf16, fp16 or int8 (attn/storage.hpp), or be a view of a checkpoint's
// memory-mapped tensor (Weight::view); rows come out as T. A language model whose head is tied to
// its embedding (tie_word_embeddings) multiplies by this same table: stored_weight().
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "attn/detail/check.hpp"
#include "attn/init.hpp"
#include "attn/storage.hpp"
#include "attn/types.hpp"
#include "attn/weight.hpp"

namespace attn {

template <class T>
class Embedding {
  ATTN_CHECK_SCALAR(T);

 public:
  // PyTorch's initialisation: weight ~ N(0, 1).
  Embedding(Index num_embeddings, Index embedding_dim, Generator& gen) {
    detail::require_shape(num_embeddings > 0 && embedding_dim > 0, "attn::Embedding",
                          "num_embeddings and embedding_dim must be positive, got ", num_embeddings, " and ",
                          embedding_dim);
    detail::checked_mul("attn::Embedding", "num_embeddings * embedding_dim", num_embeddings, embedding_dim);
    Matrix<T> w(num_embeddings, embedding_dim);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(gen.normal());
    weight_ = Weight<T>(w);
  }
  Embedding(Index num_embeddings, Index embedding_dim) : Embedding(num_embeddings, embedding_dim, default_gen()) {}
  // From its table [num_embeddings, embedding_dim], in any storage, no initialisation.
  explicit Embedding(Weight<T> weight) : weight_(std::move(weight)) {
    detail::require_shape(weight_.rows() > 0 && weight_.cols() > 0, "attn::Embedding", "weight has shape ",
                          detail::shape(weight_.rows(), weight_.cols()),
                          ", expected [num_embeddings, embedding_dim] with both positive");
  }

  // ids: n token ids in [0, num_embeddings)  ->  [n, embedding_dim]
  Matrix<T> forward(const std::vector<int>& ids) const {
    Matrix<T> out(static_cast<Index>(ids.size()), embedding_dim());
    forward_into(ids, out);
    return out;
  }
  // The same into out [n, embedding_dim], sized by the caller. An id outside the table is an
  // argument_error naming it, before anything is written.
  void forward_into(const std::vector<int>& ids, MatrixRef<T> out) const {
    const char* where = "attn::Embedding::forward";
    const Index n = static_cast<Index>(ids.size());
    detail::require_dims(where, "out", out.rows(), out.cols(), n, embedding_dim(),
                         "[ids, embedding_dim] = ", detail::shape(n, embedding_dim()));
    for (Index i = 0; i < n; ++i) check_id(ids[std::size_t(i)], i, where);
    for (Index i = 0; i < n; ++i) weight_.row_into(ids[std::size_t(i)], out.row(i).data());  // rows contiguous
  }

  Index num_embeddings() const { return weight_.rows(); }
  Index embedding_dim() const { return weight_.cols(); }

  // The table as T (a copy), and as stored.
  Matrix<T> weight() const { return weight_.matrix(); }
  const Weight<T>& stored_weight() const { return weight_; }
  Storage storage() const { return weight_.storage(); }
  // w: [num_embeddings, embedding_dim], kept in the current storage.
  void set_weight(const ConstMatrixRef<T>& w) {
    detail::require_dims("attn::Embedding::set_weight", "weight", w.rows(), w.cols(), num_embeddings(), embedding_dim(),
                         detail::shape(num_embeddings(), embedding_dim()));
    weight_.set(w);
  }
  void set_storage(Storage s) { weight_.set_storage(s); }

 private:
  void check_id(int id, Index i, const char* where) const {
    detail::require_arg(id >= 0 && id < num_embeddings(), where, "ids[", i, "] = ", id,
                        " is outside the table's [0, num_embeddings) = [0, ", num_embeddings(), ")");
  }
  static Generator& default_gen() {
    thread_local Generator gen;
    return gen;
  }

  Weight<T> weight_;  // [num_embeddings, embedding_dim]
};

}  // namespace attn

ATTN_DETAIL_EXTERN_MODULE(Embedding);
