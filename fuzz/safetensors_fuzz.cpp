// fuzz/safetensors_fuzz.cpp - libFuzzer target: the bytes are a safetensors file.
//
// attn/io/safetensors.hpp promises that every malformed file is an attn::format_error, that no
// file reads out of bounds, and that reading a header allocates at most 5 times the file's size
// (plus 1 MiB). So the input is opened with SafeTensors::from_bytes (the parser open() uses) and
// every tensor is read every way the API offers: info, raw bytes, matrix<float> and <double>,
// vector, map, tensor, mask, state_dict. Each either returns a result consistent with the others
// or throws format_error; anything else - a crash, another exception, a sanitizer report, a leak,
// a result that disagrees, a header with a NUL byte that opened - aborts. A file that opens with
// only float tensors is also written back with save_safetensors (as F64, which holds every float
// dtype exactly) and reread, mapped and read into memory: the same names, shapes, metadata, bits.
//
// Built by tools/fuzz.sh with libFuzzer (clang, fuzz/CMakeLists.txt), and by the normal test
// suite as safetensors_fuzz_replay, which runs the seeds in fuzz/corpus/safetensors_fuzz/.
#include <unistd.h>

#include <attn/io/safetensors.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <system_error>

namespace {

using attn::Index;
using attn::io::DType;
using attn::io::SafeTensors;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "safetensors_fuzz: %s\n", what.c_str());
  std::abort();
}

void require(bool ok, const std::string& name, const char* what) {
  if (!ok) fail("tensor \"" + name + "\": " + what);
}

// Whether a and b hold the same values, NaN matching NaN (a NaN's payload may change in a
// float <-> double conversion).
template <class A, class B>
bool same_values(const A* a, const B* b, Index n) {
  for (Index i = 0; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!(x == y || (x != x && y != y))) return false;
  }
  return true;
}

// Whether a and b hold the same n elements, bit for bit.
template <class T>
bool same_bits(const T* a, const T* b, Index n) {
  return n == 0 || std::memcmp(a, b, sizeof(T) * static_cast<std::size_t>(n)) == 0;
}

// Runs f, which must succeed or throw attn::format_error; returns whether it succeeded.
template <class F>
bool may_refuse(F&& f) {
  try {
    f();
    return true;
  } catch (const attn::format_error&) {
    return false;
  }
}

// Reads tensor `name` every way there is, and checks that the ways agree.
void touch(const SafeTensors& st, const std::string& name) {
  const attn::io::TensorInfo& t = st.info(name);
  const Index n = t.numel(), rows = t.rows(), cols = t.cols();
  require(n >= 0 && rows * cols == n, name, "rows * cols is not numel");
  require(t.end - t.begin == static_cast<std::uint64_t>(n) * attn::io::dtype_size(t.dtype), name,
          "the byte range does not fit the shape");

  // Every byte, so that AddressSanitizer sees a range outside the input.
  const unsigned char* bytes = st.bytes(name);
  unsigned sum = 0;
  for (std::uint64_t i = 0; i < t.end - t.begin; ++i) sum += bytes[i];
  (void)sum;

  if (!attn::io::is_floating(t.dtype)) {
    require(!may_refuse([&] { (void)st.matrix<float>(name); }), name, "matrix<float> read a non-float dtype");
    require(!may_refuse([&] { (void)st.tensor<double>(name); }), name, "tensor<double> read a non-float dtype");
    if (t.dtype == DType::BOOL) {
      attn::BoolMatrix m;
      if (may_refuse([&] { m = st.mask(name); })) {
        require(m.rows() == rows && m.cols() == cols, name, "mask() has the wrong shape");
        for (Index i = 0; i < n; ++i) require(m.data()[i] == (bytes[i] == 1), name, "mask() differs from the bytes");
      }
    } else {
      require(!may_refuse([&] { (void)st.mask(name); }), name, "mask() read a non-BOOL dtype");
    }
    return;
  }

  const attn::Matrix<float> f = st.matrix<float>(name);
  const attn::Matrix<double> d = st.matrix<double>(name);
  require(f.rows() == rows && f.cols() == cols && d.rows() == rows && d.cols() == cols, name,
          "matrix() has the wrong shape");
  // float holds every dtype but F64 exactly, and an F64 rounds to float as a static_cast does.
  const attn::Matrix<float> d_as_float = d.cast<float>();
  require(same_values(f.data(), d_as_float.data(), n), name, "matrix<float> and matrix<double> differ");

  attn::Vector<double> v;
  if (may_refuse([&] { v = st.vector<double>(name); }))
    require(v.size() == n && same_values(v.data(), d.data(), n), name, "vector() differs from matrix()");

  if (may_refuse([&] { (void)st.map<float>(name); })) {
    const Eigen::Map<const attn::Matrix<float>> m = st.map<float>(name);
    require(t.dtype == DType::F32, name, "map<float> viewed a tensor that is not F32");
    require(m.rows() == rows && m.cols() == cols && same_bits(m.data(), f.data(), n), name,
            "map<float> differs from matrix<float>");
  }
  if (may_refuse([&] { (void)st.map<double>(name); })) {
    const Eigen::Map<const attn::Matrix<double>> m = st.map<double>(name);
    require(t.dtype == DType::F64, name, "map<double> viewed a tensor that is not F64");
    require(m.rows() == rows && m.cols() == cols && same_bits(m.data(), d.data(), n), name,
            "map<double> differs from matrix<double>");
  }

  const attn::io::Tensor<float> tf = st.tensor<float>(name);
  const attn::io::Tensor<double> td = st.tensor<double>(name);
  require(tf.shape() == t.shape && td.shape() == t.shape, name, "tensor() has the wrong shape");
  require(same_values(tf.data(), f.data(), n) && same_values(td.data(), d.data(), n), name,
          "tensor() differs from matrix()");
  require(!may_refuse([&] { (void)st.mask(name); }), name, "mask() read a float dtype");
}

// Writes st's tensors as F64 beside the temporary directory and reads them back: the same names,
// shapes, metadata and values. Every float dtype converts to double exactly.
void round_trip(const SafeTensors& st) {
  const attn::io::StateDict<double> sd = st.state_dict<double>();
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("attn_safetensors_fuzz_" + std::to_string(::getpid()) + ".safetensors");
  attn::io::save_safetensors(path, sd, st.metadata());
  const SafeTensors back = SafeTensors::open(path);
  const SafeTensors read = SafeTensors::open(path, attn::io::FileAccess::Read);
  std::error_code ignored;
  std::filesystem::remove(path, ignored);

  if (back.names().size() != st.names().size()) fail("the round trip changed the number of tensors");
  if (back.metadata() != st.metadata()) fail("the round trip changed the metadata");
  for (const std::string& name : st.names()) {
    require(back.contains(name), name, "lost in the round trip");
    const attn::io::TensorInfo& t = back.info(name);
    require(t.dtype == DType::F64 && t.shape == st.info(name).shape, name, "the round trip changed the shape");
    const attn::Matrix<double> a = st.matrix<double>(name), b = back.matrix<double>(name);
    require(same_values(a.data(), b.data(), a.size()), name, "the round trip changed the values");
    const attn::Matrix<double> r = read.matrix<double>(name);
    require(read.info(name).shape == t.shape && same_values(r.data(), b.data(), b.size()), name,
            "FileAccess::Read reads other values than Map");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const SafeTensors st = SafeTensors::from_bytes(data, size, "fuzz input");
    // A file that opens has a header of JSON to its last byte: no NUL (nlohmann's parser stops at
    // one, so "{...}\0<garbage>" once opened).
    std::uint64_t header = 0;
    for (int b = 7; b >= 0; --b) header = (header << 8) | data[b];
    if (std::memchr(data + 8, 0, static_cast<std::size_t>(header))) fail("a file whose header holds a NUL byte opened");
    bool all_float = true;
    for (const std::string& name : st.names()) {
      if (!st.contains(name)) fail("names() lists \"" + name + "\", which contains() denies");
      touch(st, name);
      all_float = all_float && attn::io::is_floating(st.info(name).dtype);
    }
    if (may_refuse([&] { (void)st.info("\x01 no such tensor"); })) fail("info() found a tensor that is not there");
    if (all_float) round_trip(st);
  } catch (const attn::format_error&) {
    // The documented answer to a malformed file.
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
