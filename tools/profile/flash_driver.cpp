// tools/profile/flash_driver.cpp - one flash-attention call to profile (tools/profile_kernel.sh).
//
//   flash_driver L H D [causal] [threads]     self-attention core, B = 1, S = L, float
//
// Runs the kernel once to warm up, then `repeats` (3) more times, and prints the best time.
#include <attn/detail/attention.hpp>
#include <attn/init.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  using attn::Index;
  const Index L = argc > 1 ? std::atol(argv[1]) : 1024, H = argc > 2 ? std::atol(argv[2]) : 2;
  const Index D = argc > 3 ? std::atol(argv[3]) : 64;
  const bool causal = argc > 4 && std::atoi(argv[4]) != 0;
  const int threads = argc > 5 ? std::atoi(argv[5]) : 1;
  attn::Generator gen(1);
  attn::Matrix<float> q(L, H * D), k(L, H * D), v(L, H * D), out(L, H * D);
  for (attn::Matrix<float>* m : {&q, &k, &v})
    for (Index i = 0; i < m->size(); ++i) m->data()[i] = static_cast<float>(gen.normal());

  attn::detail::AttentionProblem<float> p;  // heads read in place from [L, H*D], as MHA does
  p.batch = 1, p.heads = H, p.L = L, p.S = L, p.mask_keys = L, p.d = D, p.dv = D;
  p.q = {q.data(), 0, D, H * D};
  p.k = {k.data(), 0, D, H * D};
  p.v = {v.data(), 0, D, H * D};
  p.out = {out.data(), 0, D, H * D};
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.causal = causal ? attn::Causal::TopLeft : attn::Causal::None;

  const auto blocks = attn::detail::flash_blocks(p);
  attn::detail::attention_flash(p, blocks, threads);
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    attn::detail::attention_flash(p, blocks, threads);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("L=%ld H=%ld D=%ld causal=%d threads=%d: %.2f ms, %.1f GFLOP/s\n", static_cast<long>(L),
              static_cast<long>(H), static_cast<long>(D), int(causal), threads, best * 1e3,
              4.0 * double(H) * double(L) * double(L) * double(D) / best * 1e-9);
}
