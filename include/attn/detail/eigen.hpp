// attn/detail/eigen.hpp - <Eigen/Core>, as every attn header includes it.
//
// GCC 12 with AVX-512 enabled (-march=native on a recent x86) warns "'__Y' may be used
// uninitialized" hundreds of times from its own avx512fintrin.h wherever Eigen's vectorized code
// is inlined (GCC bug 105593, a false positive fixed in GCC 13): a user's -Wall -Werror build
// would stop on Eigen's code, not theirs. The warnings are reported at locations inside the
// intrinsics header, so ignoring them around the include that first brings it in silences them
// and nothing else: the user's own code keeps both warnings. (When a program includes Eigen
// before attn, Eigen's include is the first and this cannot reach it: include attn first, or add
// -Wno-maybe-uninitialized for GCC < 13.)
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <Eigen/Core>
#pragma GCC diagnostic pop
#else
#include <Eigen/Core>
#endif
