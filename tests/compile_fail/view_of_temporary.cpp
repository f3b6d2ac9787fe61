// Must not compile: attn::view of a temporary would be a mask that reads freed memory after the
// statement ends. A mask built from the temporary itself takes it over (ctest
// compile_fail.view_of_temporary matches the deleted overload in the first error).
#include <attn/mask.hpp>

int main() {
  const attn::IgnoreMask m(attn::view(attn::BoolMatrix::Zero(2, 3).eval()));
  (void)m;
}
