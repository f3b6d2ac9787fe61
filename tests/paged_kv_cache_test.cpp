// tests/paged_kv_cache_test.cpp - attn::PagedKVCache: pages taken and returned by hand, prefix
// sharing with copy-on-write by hand, out-of-pages errors that change nothing, and attention
// through the page tables equal to the same positions in a contiguous KVCache, bitwise, in every
// storage type.
#include <gtest/gtest.h>

#include <attn/grouped_query_attention.hpp>
#include <attn/kv_cache.hpp>
#include <attn/paged_kv_cache.hpp>

#include <random>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::IndexVector;
using attn::Matrix;
using attn::PagedKVCache;

// Row r, column c holds 100 * r + c + offset: every element says where it came from.
Matrix<float> numbered(Index rows, Index cols, float offset) {
  Matrix<float> m(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) m(r, c) = 100.0f * float(r) + float(c) + offset;
  return m;
}

Matrix<float> random(Index rows, Index cols, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

IndexVector ids(std::initializer_list<Index> xs) {
  IndexVector v(Index(xs.size()));
  Index i = 0;
  for (Index x : xs) v[i++] = x;
  return v;
}

// Pages of 2 positions, 5 pages, 1 kv head of 2 features: page 0 is taken first.
TEST(PagedKVCache, PagesAreTakenAsSequencesGrowAndReturnedWhenTheyEnd) {
  PagedKVCache<float> cache(attn::KVStorage::Native, 1, 2, /*page_size=*/2, /*num_pages=*/5);
  const Index a = cache.add_sequence(), b = cache.add_sequence();
  EXPECT_EQ(cache.free_pages(), 5);
  cache.append(a, numbered(3, 2, 0), numbered(3, 2, 0.5f));  // positions 0..2: pages 0, 1
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 1}));
  cache.append(b, numbered(1, 2, 10), numbered(1, 2, 10.5f));  // page 2
  cache.append(a, numbered(1, 2, 300), numbered(1, 2, 300.5f));  // position 3: page 1's second row
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 1}));
  EXPECT_EQ(cache.free_pages(), 2);
  EXPECT_EQ(cache.size(a), 4);
  // Sequence a's keys in position order: rows 0, 1, 2 of the first append, then 300 + (0, 1).
  EXPECT_EQ(cache.keys(a, 0), attn_test::mat<float>({{0, 1}, {100, 101}, {200, 201}, {300, 301}}));
  EXPECT_EQ(cache.values(b, 0), attn_test::mat<float>({{10.5f, 11.5f}}));
  cache.free(a);
  EXPECT_EQ(cache.free_pages(), 4);
  EXPECT_FALSE(cache.is_live(a));
  EXPECT_THROW(cache.size(a), attn::argument_error);
  // The id is used again, and the pages freed last are taken first.
  EXPECT_EQ(cache.add_sequence(), a);
  cache.append(a, numbered(1, 2, 0), numbered(1, 2, 0));
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{1}));
}

// fork shares every page; appending to a shared, partly filled last page copies it first, and only
// for the sequence that writes: the other one keeps its page, and what it attends, unchanged.
TEST(PagedKVCache, ForkSharesPagesAndCopiesTheLastOneOnWrite) {
  PagedKVCache<float> cache(attn::KVStorage::Native, 1, 2, 2, 6);
  const Index a = cache.add_sequence();
  cache.append(a, numbered(3, 2, 0), numbered(3, 2, 0));  // pages 0 (full), 1 (one row)
  const Index b = cache.fork(a);
  EXPECT_EQ(cache.pages(b), (std::vector<Index>{0, 1}));
  EXPECT_EQ(cache.page_refs(0), 2);
  EXPECT_EQ(cache.page_refs(1), 2);
  EXPECT_EQ(cache.free_pages(), 4);
  // b writes position 3 into page 1, which a holds too: b gets page 2, a copy of page 1, first.
  cache.append(b, numbered(1, 2, 1000), numbered(1, 2, 1000));
  EXPECT_EQ(cache.pages(b), (std::vector<Index>{0, 2}));
  EXPECT_EQ(cache.page_refs(1), 1);
  EXPECT_EQ(cache.page_refs(2), 1);
  EXPECT_EQ(cache.keys(b, 0), attn_test::mat<float>({{0, 1}, {100, 101}, {200, 201}, {1000, 1001}}));
  EXPECT_EQ(cache.keys(a, 0), attn_test::mat<float>({{0, 1}, {100, 101}, {200, 201}}));
  // a writes into page 1, now its own: no copy.
  cache.append(a, numbered(1, 2, 2000), numbered(1, 2, 2000));
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 1}));
  EXPECT_EQ(cache.keys(a, 0).row(3), attn_test::mat<float>({{2000, 2001}}));
  EXPECT_EQ(cache.keys(b, 0).row(3), attn_test::mat<float>({{1000, 1001}}));
  // A full shared page is never written: appending past it takes a new page, no copy.
  const Index c = cache.fork(a);  // a: 4 positions, pages 0, 1 both full
  cache.append(c, numbered(1, 2, 3000), numbered(1, 2, 3000));
  EXPECT_EQ(cache.pages(c), (std::vector<Index>{0, 1, 3}));
  EXPECT_EQ(cache.page_refs(0), 3);
  cache.free(a);
  cache.free(b);
  EXPECT_EQ(cache.page_refs(0), 1);
  EXPECT_EQ(cache.page_refs(2), 0);
  EXPECT_EQ(cache.free_pages(), 3);  // 2, 4, 5
}

TEST(PagedKVCache, OutOfPagesIsAnErrorThatChangesNothing) {
  PagedKVCache<float> cache(attn::KVStorage::Int8, 2, 4, 4, 3);
  const Index a = cache.add_sequence();
  cache.append(a, numbered(6, 8, 0), numbered(6, 8, 0));  // pages 0, 1
  const Index b = cache.fork(a);
  // 3 more rows for b: page 1 (shared, 2 rows) must be copied and a page added: 2 pages, 1 free.
  EXPECT_THROW(cache.append(b, numbered(3, 8, 0), numbered(3, 8, 0)), attn::argument_error);
  EXPECT_EQ(cache.size(b), 6);
  EXPECT_EQ(cache.pages(b), (std::vector<Index>{0, 1}));
  EXPECT_EQ(cache.free_pages(), 1);
  EXPECT_EQ(cache.page_refs(1), 2);
  cache.append(b, numbered(2, 8, 0), numbered(2, 8, 0));  // the copy alone: fits
  EXPECT_EQ(cache.pages(b), (std::vector<Index>{0, 2}));
  EXPECT_THROW(cache.append(a, numbered(1, 7, 0), numbered(1, 8, 0)), attn::shape_error);
  EXPECT_THROW(cache.append(7, numbered(1, 8, 0), numbered(1, 8, 0)), attn::argument_error);
  EXPECT_THROW(PagedKVCache<float>(attn::KVStorage::Native, 1, 4, 0, 3), attn::argument_error);
}

// Sequences of 1..700 positions (some forked from others: shared prefixes, copied pages) in a
// paged cache and the same positions in a KVCache of the same storage type; a ragged step mixing
// decoding and prompt chunks through the page tables equals the KVCache's, bitwise, lse included.
TEST(PagedKVCache, AttentionThroughPagesEqualsTheContiguousCacheBitwise) {
  const attn::KVStorage storages[] = {attn::KVStorage::Native, attn::KVStorage::BFloat16, attn::KVStorage::Float16,
                                      attn::KVStorage::Int8};
  int c = 0;
  for (const attn::KVStorage storage : storages)
    for (const Index page : {Index(16), Index(5)}) {
      std::mt19937_64 rng(77 + std::uint64_t(c++));
      const Index Hkv = 2, H = 4, D = 24, B = 5;
      PagedKVCache<float> paged(storage, Hkv, D, page, 400);
      attn::KVCache<float> flat(storage, B, Hkv, D, 800);
      // Sequences 0, 1, 2 from scratch; 3 forks 1 at 301 positions, 4 forks 0 at 7; then all grow.
      const std::vector<Index> first = {7, 301, 1}, more = {20, 64, 600, 39, 2};
      std::vector<Index> seq;
      std::vector<Matrix<float>> ks(B), vs(B);  // every row appended to sequence b, in order
      const auto flat_append = [&](Index b, const Matrix<float>& k, const Matrix<float>& v) {
        flat.append(b, k, v);
        Matrix<float>& hk = ks[std::size_t(b)];
        Matrix<float>& hv = vs[std::size_t(b)];
        hk.conservativeResize(hk.rows() + k.rows(), k.cols()), hv.conservativeResize(hv.rows() + v.rows(), v.cols());
        hk.bottomRows(k.rows()) = k, hv.bottomRows(v.rows()) = v;
      };
      const auto grow = [&](Index b, Index n) {
        const Matrix<float> k = random(n, Hkv * D, rng), v = random(n, Hkv * D, rng);
        paged.append(seq[std::size_t(b)], k, v);
        flat_append(b, k, v);
      };
      for (Index b = 0; b < 3; ++b) {
        seq.push_back(paged.add_sequence());
        grow(b, first[std::size_t(b)]);
      }
      for (const Index from : {Index(1), Index(0)}) {  // a fork: the same rows appended to the flat cache
        seq.push_back(paged.fork(seq[std::size_t(from)]));
        const Matrix<float> k = ks[std::size_t(from)], v = vs[std::size_t(from)];
        flat_append(Index(seq.size()) - 1, k, v);
      }
      for (Index b = 0; b < B; ++b) grow(b, more[std::size_t(b)]);
      for (Index b = 0; b < B; ++b)
        for (Index h = 0; h < Hkv; ++h) {
          ASSERT_EQ(paged.keys(seq[std::size_t(b)], h), flat.keys(b, h)) << "sequence " << b << ", storage " << int(storage);
          ASSERT_EQ(paged.values(seq[std::size_t(b)], h), flat.values(b, h));
        }

      const attn::GroupedQueryAttention<float> gqa(H, Hkv);
      attn::CacheArgs<float> args;
      if (c % 2) args.softcap = 3.0f;
      if (c % 3 == 0) args.window = 100;
      const std::vector<Index> Lq = {1, 7, 1, 0, 2};
      IndexVector cu(B + 1);
      cu[0] = 0;
      for (Index b = 0; b < B; ++b) cu[b + 1] = cu[b] + Lq[std::size_t(b)];
      const Matrix<float> q = random(cu[B], H * D, rng);
      IndexVector order(B);
      for (Index b = 0; b < B; ++b) order[b] = seq[std::size_t(b)];
      Matrix<float> out(cu[B], H * D), lse(H, cu[B]), want(cu[B], H * D), want_lse(H, cu[B]);
      gqa.forward_varlen_into(q, paged, order, cu, args, out, lse);
      gqa.forward_varlen_into(q, flat, cu, args, want, want_lse);
      ASSERT_TRUE(out == want) << "storage " << int(storage) << ", page " << page;
      ASSERT_TRUE(lse == want_lse);
      EXPECT_TRUE(out == gqa.forward_varlen(q, paged, order, cu, args));
    }
}

TEST(PagedKVCache, AttentionRejectsWhatTheCacheCannotServe) {
  PagedKVCache<float> cache(attn::KVStorage::Native, 1, 4, 4, 8);
  std::mt19937_64 rng(3);
  const Index a = cache.add_sequence();
  cache.append(a, random(3, 4, rng), random(3, 4, rng));
  const attn::GroupedQueryAttention<float> gqa(2, 1);
  const Matrix<float> q = random(2, 8, rng);
  EXPECT_THROW(gqa.forward_varlen(q, cache, ids({a, 9}), ids({0, 1, 2})), attn::argument_error);  // no sequence 9
  EXPECT_THROW(gqa.forward_varlen(q, cache, ids({a}), ids({0, 1, 2})), attn::shape_error);        // 1 id, 2 offsets
  EXPECT_THROW(gqa.forward_varlen(random(4, 8, rng), cache, ids({a}), ids({0, 4})), attn::argument_error);  // 4 > 3
  const attn::GroupedQueryAttention<float> other(2, 2);
  EXPECT_THROW(other.forward_varlen(q, cache, ids({a}), ids({0, 2})), attn::shape_error);
  EXPECT_EQ(gqa.forward_varlen(q, cache, ids({a}), ids({0, 2})).rows(), 2);
}

}  // namespace
