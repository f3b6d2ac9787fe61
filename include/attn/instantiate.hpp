// attn/instantiate.hpp - attn's kernels and modules for float and double, compiled once per
// program.
//
// Opt-in, for programs whose build time matters. By default every translation unit that uses an
// attention module compiles the attention and projection kernels and the module's members again
// (most of its compile time: tools/compile_time.sh). Instead:
//
//   1. define ATTN_EXTERN_TEMPLATES when compiling the program's files (-DATTN_EXTERN_TEMPLATES):
//      they then only declare the kernels and the modules' members, whichever headers they include;
//   2. add one .cpp holding this one line, compiled with the same flags as the rest (the same
//      -march above all: Eigen's code must be compiled alike in every file of a program):
//        #include <attn/instantiate.hpp>
//
// With CMake, `target_link_libraries(app PRIVATE attn::extern_templates)` does both for target
// app. The results are bitwise the same either way (tests/extern_templates_test.cpp). attn/io is
// not covered (it needs nlohmann_json, which attn itself does not).
#pragma once

#include "attn/detail/attention.hpp"
#include "attn/detail/gemm.hpp"
#include "attn/detail/module_instances.hpp"
#include "attn/types.hpp"

namespace attn::detail {

// The dispatch points that ATTN_EXTERN_TEMPLATES declares extern (detail/attention.hpp and
// detail/gemm.hpp); every kernel behind them is instantiated with them.
template void attention<float>(const AttentionProblem<float>*, Index);
template void attention<double>(const AttentionProblem<double>*, Index);
template void linear_into<float>(const ConstMatrixRef<float>&, const WeightView<float>&, const float*,
                                 MatrixRef<float>, int, Precision);
template void linear_into<double>(const ConstMatrixRef<double>&, const WeightView<double>&, const double*,
                                  MatrixRef<double>, int, Precision);

}  // namespace attn::detail

// Every member of the modules (attn/detail/module_instances.hpp).
#define ATTN_DETAIL_INSTANTIATE_MODULE(Module) \
  template class attn::Module<float>;          \
  template class attn::Module<double>;
ATTN_DETAIL_MODULES(ATTN_DETAIL_INSTANTIATE_MODULE)
#undef ATTN_DETAIL_INSTANTIATE_MODULE
