// examples/sentence_embeddings.cpp - sentence embeddings from a BERT-family checkpoint directory
// (BERT, RoBERTa; e.g. sentence-transformers' all-MiniLM-L6-v2), from token ids: each sentence's
// mean-pooled last hidden state (sentence-transformers' pooling), L2-normalized, and the cosine
// similarity of every pair. Tokenization stays outside attn (the README pairs it with Hugging
// Face's `tokenizers`).
//
//   build/examples/sentence_embeddings all-MiniLM-L6-v2 "101 7592 2088 102" "101 7592 2154 102"
//
// Each argument after the directory is one sentence's token ids (with the tokenizer's special
// tokens, [CLS] ... [SEP] for BERT). The sentences run as one batch, padded on the right with the
// config's pad_token_id and masked.
#include <attn/attn.hpp>
#include <attn/models/load.hpp>
#include <cmath>
#include <cstdio>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3 || std::string(argv[1]) == "--help") {
    std::fprintf(stderr, "usage: %s CHECKPOINT_DIR \"ID ID ...\" [\"ID ID ...\" ...]\n", argv[0]);
    return 2;
  }
  try {
    const auto ckpt = attn::io::Checkpoint::open(argv[1]);
    const attn::models::BertModel<float> model = attn::models::load_encoder<float>(ckpt);
    const int pad = ckpt.config().value("pad_token_id", 0);

    std::vector<std::vector<int>> sentences;
    std::size_t L = 0;
    for (int i = 2; i < argc; ++i) {
      std::istringstream in(argv[i]);
      std::vector<int> ids;
      for (int id; in >> id;) ids.push_back(id);
      if (ids.empty() || !in.eof()) throw std::invalid_argument(std::string("not token ids: \"") + argv[i] + "\"");
      L = std::max(L, ids.size());
      sentences.push_back(ids);
    }
    // One batch [B, L], padded on the right; attention_mask 1 for tokens.
    const attn::Index B = static_cast<attn::Index>(sentences.size());
    std::vector<int> ids, mask;
    for (const auto& s : sentences)
      for (std::size_t l = 0; l < L; ++l) {
        ids.push_back(l < s.size() ? s[l] : pad);
        mask.push_back(l < s.size() ? 1 : 0);
      }
    const auto out = model.forward(ids, B, mask);
    attn::Matrix<float> e = attn::models::mean_pooling<float>(out.last_hidden_state, mask, B);
    e.rowwise().normalize();

    for (attn::Index b = 0; b < B; ++b) {
      std::printf("sentence %lld: [", (long long)b);
      for (attn::Index c = 0; c < std::min<attn::Index>(e.cols(), 6); ++c)
        std::printf("%s%.4f", c ? ", " : "", e(b, c));
      std::printf("%s] (%lld dims, normalized)\n", e.cols() > 6 ? ", ..." : "", (long long)e.cols());
    }
    for (attn::Index a = 0; a < B; ++a)
      for (attn::Index b = a + 1; b < B; ++b)
        std::printf("cosine(%lld, %lld) = %.4f\n", (long long)a, (long long)b, e.row(a).dot(e.row(b)));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sentence_embeddings: %s\n", e.what());
    return 1;
  }
}
