// examples/context_parallel.cpp - causal attention over one sequence split across MPI ranks
// (attn/dist), checked against the same attention in one process.
//
//   mpirun -np 2 build/examples/context_parallel 8192
//
// Each rank holds 1/P of the queries, keys and values (the zig-zag layout: under causal masking
// every rank has the same work); the keys and values travel around the ring of ranks.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include <attn/dist/context_parallel.hpp>
#include <attn/grouped_query_attention.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  bool ok = false;
  {
    const attn::Index L = argc > 1 ? std::atol(argv[1]) : 4096, H = 8, H_kv = 2, d = 64;
    attn::dist::ContextParallelAttention<float> cp(MPI_COMM_WORLD, H, H_kv);
    const attn::dist::Sharding sh = cp.sharding(L);  // Layout::ZigZag

    // Every rank makes the whole sequence here (Eigen's Random draws the same numbers on every
    // rank), to check its rows against one process; a real program makes or reads its own rows.
    const attn::Matrix<float> q = attn::Matrix<float>::Random(L, H * d), k = attn::Matrix<float>::Random(L, H_kv * d),
                              v = attn::Matrix<float>::Random(L, H_kv * d);
    const int r = cp.rank();
    attn::dist::ContextArgs<float> args;
    args.batch = 1;
    args.causal = attn::Causal::BottomRight;
    const attn::Matrix<float> out =
        cp.forward(sh.shard<float>(q, 1, r), sh.shard<float>(k, 1, r), sh.shard<float>(v, 1, r), args);

    attn::GqaArgs<float> one;
    one.batch = 1;
    one.causal = attn::Causal::BottomRight;
    const attn::Matrix<float> want = sh.shard<float>(attn::GroupedQueryAttention<float>(H, H_kv).forward(q, k, v, one), 1, r);
    float err = (out - want).cwiseAbs().maxCoeff();
    MPI_Reduce(r == 0 ? MPI_IN_PLACE : &err, &err, 1, MPI_FLOAT, MPI_MAX, 0, MPI_COMM_WORLD);
    if (r == 0)
      std::printf("%d ranks, %ld tokens, %ld heads: each rank held %ld rows; max |difference| from one process: %.2g\n",
                  cp.ranks(), long(L), long(H), long(sh.local_len(0)), double(err));
    MPI_Bcast(&err, 1, MPI_FLOAT, 0, MPI_COMM_WORLD);
    ok = err <= 1e-5f;
  }
  MPI_Finalize();
  return ok ? 0 : 1;
}
