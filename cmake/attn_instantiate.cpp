// attn's kernels, compiled once for the whole program: the source file that the CMake target
// attn::extern_templates adds to the target linking it (with that target's flags), which also
// defines ATTN_EXTERN_TEMPLATES for all of the target's files. See attn/instantiate.hpp.
#include <attn/instantiate.hpp>
