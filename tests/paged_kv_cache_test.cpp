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

// Appends x's rows to h: the rows a sequence was given, in order, to give a fork the same.
void append_rows(Matrix<float>& h, const Matrix<float>& x) {
  h.conservativeResize(h.rows() + x.rows(), x.cols());
  h.bottomRows(x.rows()) = x;
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
        append_rows(ks[std::size_t(b)], k), append_rows(vs[std::size_t(b)], v);
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

// Pages of 2 positions, 8 pages, window 3, one sink token. The queries of an append at position t
// see positions t - 2 on (and the sink, position 0), so the append releases the pages that end at
// or before t - 2, except page index 0 (it holds the sink):
//   t = 0..5: nothing to release; pages 0, 1, 2 taken at t = 0, 2, 4
//   t = 6: index 1 (positions 2, 3) ends at 4 <= 6 - 2: page 1 returns, and index 3 takes it again
//   t = 8: index 2 (positions 4, 5) ends at 6 <= 8 - 2: page 2 returns, and index 4 takes it
// Released entries read the page of zeros, id num_pages() = 8.
TEST(PagedKVCache, AWindowReleasesThePagesBehindItAndKeepsTheSinkTokens) {
  PagedKVCache<float> cache(attn::KVStorage::Native, 1, 2, /*page_size=*/2, /*num_pages=*/8);
  cache.set_window(3, /*sink_tokens=*/1);
  const Index a = cache.add_sequence();
  for (Index t = 0; t < 6; ++t) cache.append(a, numbered(1, 2, float(t) * 1000), numbered(1, 2, 0));
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 1, 2}));
  EXPECT_EQ(cache.first_kept(a), 0);
  cache.append(a, numbered(1, 2, 6000), numbered(1, 2, 0));  // t = 6
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 8, 2, 1}));
  EXPECT_EQ(cache.first_kept(a), 4);
  cache.append(a, numbered(1, 2, 7000), numbered(1, 2, 0));
  cache.append(a, numbered(1, 2, 8000), numbered(1, 2, 0));  // t = 8
  cache.append(a, numbered(1, 2, 9000), numbered(1, 2, 0));
  EXPECT_EQ(cache.pages(a), (std::vector<Index>{0, 8, 8, 1, 2}));
  EXPECT_EQ(cache.first_kept(a), 6);
  EXPECT_EQ(cache.size(a), 10);
  EXPECT_EQ(cache.free_pages(), 5);  // 10 positions on 3 pages
  EXPECT_EQ(cache.keys(a, 0), attn_test::mat<float>({{0, 1},
                                                     {1000, 1001},
                                                     {0, 0},  // released
                                                     {0, 0},
                                                     {0, 0},
                                                     {0, 0},
                                                     {6000, 6001},
                                                     {7000, 7001},
                                                     {8000, 8001},
                                                     {9000, 9001}}));
  // A fork holds the same pages, and the released entries stay released; freeing returns the rest.
  const Index b = cache.fork(a);
  EXPECT_EQ(cache.pages(b), (std::vector<Index>{0, 8, 8, 1, 2}));
  EXPECT_EQ(cache.page_refs(1), 2);
  cache.free(a);
  cache.free(b);
  EXPECT_EQ(cache.free_pages(), 8);
  // Settings: before any sequence, and sink tokens only with a window.
  EXPECT_THROW(PagedKVCache<float>(attn::KVStorage::Native, 1, 2, 2, 8).set_window(0, 1), attn::argument_error);
  EXPECT_THROW(PagedKVCache<float>(attn::KVStorage::Native, 1, 2, 2, 8).set_window(-1), attn::argument_error);
  cache.add_sequence();
  EXPECT_THROW(cache.set_window(4), attn::argument_error);
  EXPECT_EQ(cache.window(), 3);
  EXPECT_EQ(cache.sink_tokens(), 1);
}

// With a window, memory follows the window, not the sequence: 3 pages of 4 positions serve a
// window of 4 for ever (the append at t releases the pages ending at or before t - 3; a decoding
// step then holds at most 2 pages). The out-of-pages check counts the pages an append releases.
TEST(PagedKVCache, AWindowedSequenceDecodesForEverOnAFewPages) {
  PagedKVCache<float> cache(attn::KVStorage::BFloat16, 2, 4, /*page_size=*/4, /*num_pages=*/3);
  cache.set_window(4);
  const Index a = cache.add_sequence();
  const attn::GroupedQueryAttention<float> gqa(2, 2);
  std::mt19937_64 rng(5);
  for (Index t = 0; t < 1000; ++t) {
    cache.append(a, random(1, 8, rng), random(1, 8, rng));
    gqa.forward_varlen(random(1, 8, rng), cache, ids({a}), ids({0, 1}));
  }
  EXPECT_EQ(cache.size(a), 1000);
  EXPECT_GE(cache.free_pages(), 1);
  // 9 more positions at once would need 3 new pages with 2 held: too many, and nothing changes.
  const std::vector<Index> before = cache.pages(a);
  EXPECT_THROW(cache.append(a, random(9, 8, rng), random(9, 8, rng)), attn::argument_error);
  EXPECT_EQ(cache.pages(a), before);
  EXPECT_EQ(cache.size(a), 1000);
}

// A windowed paged cache attends what a full contiguous cache attends under the same window and
// sink tokens, bitwise (released positions are masked either way), over many appends of decoding
// steps and chunks, in every storage type, with sequences forked mid-way.
TEST(PagedKVCache, AWindowedPagedCacheEqualsAFullCacheWithTheWindowBitwise) {
  const attn::KVStorage storages[] = {attn::KVStorage::Native, attn::KVStorage::BFloat16, attn::KVStorage::Float16,
                                      attn::KVStorage::Int8};
  int c = 0;
  for (const attn::KVStorage storage : storages)
    for (const Index sinks : {Index(0), Index(3)}) {
      std::mt19937_64 rng(300 + std::uint64_t(c++));
      const Index Hkv = 2, H = 4, D = 16, B = 3, W = 37, page = 8;
      PagedKVCache<float> paged(storage, Hkv, D, page, 64);
      paged.set_window(W, sinks);
      attn::KVCache<float> flat(storage, B, Hkv, D, 1200);
      attn::CacheArgs<float> wanted;  // the full cache's masks: the paged cache's window and sinks
      wanted.window = W, wanted.sink_tokens = sinks;
      attn::CacheArgs<float> args;  // none: the paged cache applies its own
      if (c % 2) args.softcap = wanted.softcap = 2.5f;
      const attn::GroupedQueryAttention<float> gqa(H, Hkv);
      std::vector<Index> seq = {paged.add_sequence(), paged.add_sequence()};
      std::vector<Matrix<float>> ks(B), vs(B);  // every row appended to sequence b, in order
      const auto append = [&](Index b, const Matrix<float>& k, const Matrix<float>& v) {
        flat.append(b, k, v);
        append_rows(ks[std::size_t(b)], k), append_rows(vs[std::size_t(b)], v);
      };
      Index held_max = 0;
      for (Index step = 0; step < 60; ++step) {
        if (step == 20) {  // sequence 2 forks sequence 0, and the flat cache gets its rows
          seq.push_back(paged.fork(seq[0]));
          const Matrix<float> k = ks[0], v = vs[0];
          append(2, k, v);
        }
        const Index n = Index(seq.size());
        std::vector<Index> Lq(static_cast<std::size_t>(n));
        IndexVector cu(n + 1), order(n);
        cu[0] = 0;
        for (Index b = 0; b < n; ++b) {
          Lq[std::size_t(b)] = step % 7 == 0 ? Index(rng() % 40) : Index(rng() % 2);
          cu[b + 1] = cu[b] + Lq[std::size_t(b)];
          order[b] = seq[std::size_t(b)];
          const Matrix<float> k = random(Lq[std::size_t(b)], Hkv * D, rng), v = random(Lq[std::size_t(b)], Hkv * D, rng);
          paged.append(seq[std::size_t(b)], k, v);
          append(b, k, v);
        }
        const Matrix<float> q = random(cu[n], H * D, rng);
        Matrix<float> out(cu[n], H * D), lse(H, cu[n]);
        gqa.forward_varlen_into(q, paged, order, cu, args, out, lse);
        for (Index b = 0; b < n; ++b) {
          const Index L = Lq[std::size_t(b)];
          if (L == 0) continue;
          Matrix<float> want(L, H * D), want_lse(H, L);
          gqa.forward_into(q.middleRows(cu[b], L), flat, b, wanted, want, want_lse);
          ASSERT_TRUE(out.middleRows(cu[b], L) == want) << "storage " << int(storage) << ", step " << step;
          ASSERT_TRUE(lse.middleCols(cu[b], L) == want_lse);
        }
        held_max = std::max(held_max, 64 - paged.free_pages());
      }
      // Three sequences of ~400 positions: each holds its sink page, the window and one chunk.
      EXPECT_LE(held_max, 3 * (1 + (W + 40) / page + 2)) << "storage " << int(storage);
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

  // A windowed cache: args may narrow its window and sink tokens, not widen them; the queries of
  // two appends at once may need pages the second append released.
  PagedKVCache<float> windowed(attn::KVStorage::Native, 1, 4, 4, 8);
  windowed.set_window(6, 2);
  const Index w = windowed.add_sequence();
  windowed.append(w, random(12, 4, rng), random(12, 4, rng));
  attn::CacheArgs<float> args;
  args.window = 7;
  EXPECT_THROW(gqa.forward_varlen(q, windowed, ids({w}), ids({0, 2}), args), attn::argument_error);
  args.window = 5, args.sink_tokens = 3;
  EXPECT_THROW(gqa.forward_varlen(q, windowed, ids({w}), ids({0, 2}), args), attn::argument_error);
  args.sink_tokens = 1;
  EXPECT_EQ(gqa.forward_varlen(q, windowed, ids({w}), ids({0, 2}), args).rows(), 2);
  windowed.append(w, random(4, 4, rng), random(4, 4, rng));  // at 12: sees 7 on, releases nothing
  EXPECT_EQ(windowed.first_kept(w), 0);
  windowed.append(w, random(1, 4, rng), random(1, 4, rng));  // at 16: sees 11 on, releases 4..7
  EXPECT_EQ(windowed.first_kept(w), 8);
  // The 6 newest queries start at position 11, whose window of 6 begins at 6: released.
  EXPECT_THROW(gqa.forward_varlen(random(6, 8, rng), windowed, ids({w}), ids({0, 6})), attn::argument_error);
  EXPECT_EQ(gqa.forward_varlen(random(3, 8, rng), windowed, ids({w}), ids({0, 3})).rows(), 3);

  // A sliding-window KVCache (a ring) does not keep position 0: sink tokens are refused there.
  attn::KVCache<float> ring(1, 1, 4, 8, /*window=*/4);
  ring.append(random(2, 4, rng), random(2, 4, rng));
  attn::CacheArgs<float> sink_args;
  sink_args.sink_tokens = 1;
  EXPECT_THROW(gqa.forward(random(1, 8, rng), ring, sink_args), attn::argument_error);
}

}  // namespace
