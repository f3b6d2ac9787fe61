// Must not compile: attn computes in float or double, and says so in one static_assert at the
// user's line (ctest compile_fail.bfloat16_scalar matches the message) rather than in template
// errors from inside detail/.
#include <attn/attn.hpp>

int main() {
  attn::MultiHeadAttention<Eigen::bfloat16> mha(8, 2);
  (void)mha;
}
