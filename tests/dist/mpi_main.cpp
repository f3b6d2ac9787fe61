// main() of the tests under mpirun: MPI around GoogleTest, one attn thread per rank (P ranks share
// the machine's cores).
#include <mpi.h>

#include <gtest/gtest.h>

#include "attn/threads.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  attn::set_num_threads(1);
  const int rc = RUN_ALL_TESTS();
  MPI_Finalize();
  return rc;
}
