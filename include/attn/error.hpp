// attn/error.hpp - what attn throws when a caller passes something it cannot use.
//
// Every public entry point checks its arguments in every build type (the checks are O(1) beside
// the work they guard) and throws one of these, with the argument's name and the shapes involved:
//
//   try { mha.forward(q, k, v); } catch (const attn::shape_error& e) { std::cerr << e.what(); }
//   // attn::MultiHeadAttention::forward: key has shape [7, 16], expected [B*S, kdim] = [?, 8]
#pragma once

#include <stdexcept>

namespace attn {

// A tensor whose dimensions do not fit the call (or a module built with dimensions that cannot
// work, such as embed_dim not divisible by num_heads).
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A value that is not a shape but is still unusable (a NaN scale, for example).
class argument_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A file or a state dict that cannot be read as asked (attn/io/): malformed bytes, a missing or
// unexpected tensor, a dtype that does not fit. The message names the file, the tensor and the
// problem.
class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace attn
