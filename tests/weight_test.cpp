// tests/weight_test.cpp - attn/weight.hpp: a weight kept in bf16, fp16 or int8, and every
// projection that holds one (Linear, and set_weight_storage on the modules built on it).
//
// What is stored is checked by hand and against the storage table's bound; what is computed is
// checked against T arithmetic on the stored values (Weight::matrix()), which is the contract:
// the same bits where the kernels convert before multiplying, within T's rounding of one product
// where int8's row scale multiplies the dot product (the kernels themselves are held to the double
// loop for every shape in gemm_test).
#include <array>
#include <attn/decoder_attention.hpp>
#include <attn/feed_forward.hpp>
#include <attn/init.hpp>
#include <attn/io/state_dict.hpp>
#include <attn/linear.hpp>
#include <attn/multi_head_attention.hpp>
#include <attn/swiglu.hpp>
#include <attn/transformer.hpp>
#include <attn/weight.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn::Storage;
using attn_test::mat;
using attn_test::matrices_near;
using attn_test::throws_with;

template <class T>
class WeightTest : public ::testing::Test {};
TYPED_TEST_SUITE(WeightTest, attn_test::Scalars, attn_test::ScalarName);

constexpr std::array<Storage, 3> kCompressed = {Storage::BFloat16, Storage::Float16, Storage::Int8};

template <class T>
bool same_bits(const attn::Matrix<T>& a, const attn::Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * std::size_t(a.size())) == 0;
}

// Rounding to nearest even, by hand:
//   bf16 keeps 8 significant bits: its step in [1, 2) is 2^-7.
//     1 + 2^-9 (a quarter step) -> 1;  1 + 2^-8 (half a step, a tie) -> 1 (even);
//     1 + 3 * 2^-8 (a tie between 1 + 2^-7, odd, and 1 + 2^-6, even) -> 1 + 2^-6;  -3 -> -3
//   fp16 keeps 11: its step in [1, 2) is 2^-10.
//     1 + 2^-12 -> 1;  1 + 2^-11 (a tie) -> 1;  1 + 3 * 2^-11 (a tie) -> 1 + 2^-9;  -3 -> -3
//   int8, one scale per row, s = max|row| / 127: the row [127, -32, 16, 1] * 2^-6 has max
//     127 * 2^-6, so s = 2^-6 exactly and every value is an integer step: stored exactly. The row
//     [1, -0.5, 0.25, 0]: s = 1/127; -0.5 / s = -63.5 (a tie) -> -64, 0.25 / s = 31.75 -> 32, so
//     it comes back as s * [127, -64, 32, 0].
TYPED_TEST(WeightTest, RoundsByHand) {
  using T = TypeParam;
  const T e9 = std::ldexp(T(1), -9), e8 = std::ldexp(T(1), -8), e6 = std::ldexp(T(1), -6);
  const attn::Weight<T> bf16(mat<T>({{1 + e9, 1 + e8, 1 + 3 * e8, -3}}), Storage::BFloat16);
  EXPECT_TRUE(same_bits<T>(bf16.matrix(), mat<T>({{1, 1, 1 + e6, -3}})));

  const T f12 = std::ldexp(T(1), -12), f11 = std::ldexp(T(1), -11), f9 = std::ldexp(T(1), -9);
  const attn::Weight<T> fp16(mat<T>({{1 + f12, 1 + f11, 1 + 3 * f11, -3}}), Storage::Float16);
  EXPECT_TRUE(same_bits<T>(fp16.matrix(), mat<T>({{1, 1, 1 + f9, -3}})));

  const attn::Weight<T> int8(mat<T>({{127 * e6, -32 * e6, 16 * e6, e6}, {1, -0.5, 0.25, 0}}), Storage::Int8);
  const T s = T(1) / T(127);
  EXPECT_TRUE(same_bits<T>(int8.matrix(), mat<T>({{127 * e6, -32 * e6, 16 * e6, e6}, {s * 127, s * -64, s * 32, 0}})));
}

// Values the storage type represents come back bit for bit: a bf16 checkpoint kept in BFloat16
// loses nothing. Random values rounded to the type first, and int8 rows of integer steps of 2^-5
// with a 127 in each row (and no -0, which int8 cannot hold).
TYPED_TEST(WeightTest, RepresentableValuesLoseNothing) {
  using T = TypeParam;
  attn::Generator gen(4);
  attn::Matrix<T> w(37, 70);
  attn::init::uniform(w, -3.0, 3.0, gen);
  attn::Matrix<T> bf = w, hf = w, i8(37, 70);
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) {
      bf(r, c) = T(static_cast<float>(Eigen::bfloat16(static_cast<float>(w(r, c)))));
      hf(r, c) = T(static_cast<float>(Eigen::half(static_cast<float>(w(r, c)))));
      // (+ 0: int8 has no -0, so a row's -0 comes back as +0)
      i8(r, c) = c == r % 70 ? T(127) * std::ldexp(T(1), -5) : std::round(w(r, c) * 40) * std::ldexp(T(1), -5) + T(0);
    }
  EXPECT_TRUE(same_bits<T>(attn::Weight<T>(bf, Storage::BFloat16).matrix(), bf));
  EXPECT_TRUE(same_bits<T>(attn::Weight<T>(hf, Storage::Float16).matrix(), hf));
  EXPECT_TRUE(same_bits<T>(attn::Weight<T>(i8, Storage::Int8).matrix(), i8));
  EXPECT_TRUE(same_bits<T>(attn::Weight<T>(w, Storage::Native).matrix(), w));
}

// Every stored value is within the storage table's bound of the original: u |x| for bf16 and fp16
// (normal range), u max|row| for int8 (attn::storage_unit_roundoff).
TYPED_TEST(WeightTest, StoredValuesWithinTheStatedBound) {
  using T = TypeParam;
  attn::Generator gen(5);
  attn::Matrix<T> w(50, 90);
  attn::init::uniform(w, -4.0, 4.0, gen);
  w(3, 4) = T(1e-3), w(7, 0) = T(-2000);  // a small value and a large row
  for (const Storage s : kCompressed) {
    const attn::Matrix<T> got = attn::Weight<T>(w, s).matrix();
    const T u = attn::storage_unit_roundoff<T>(s);
    for (Index r = 0; r < w.rows(); ++r) {
      const T row_max = w.row(r).cwiseAbs().maxCoeff();
      for (Index c = 0; c < w.cols(); ++c) {
        const T bound = u * (s == Storage::Int8 ? row_max : std::abs(w(r, c)));
        ASSERT_LE(std::abs(got(r, c) - w(r, c)), bound)
            << attn::storage_name(s) << " (" << r << ", " << c << "): " << w(r, c) << " -> " << got(r, c);
      }
    }
  }
}

// Bytes: [3, 5] is 15 elements: 4 or 8 bytes each in T, 2 in bf16 and fp16, 1 in int8 plus three
// row scales in T.
TYPED_TEST(WeightTest, MemoryBytes) {
  using T = TypeParam;
  const attn::Matrix<T> w = attn::Matrix<T>::Ones(3, 5);
  EXPECT_EQ(attn::Weight<T>(w).memory_bytes(), 15 * sizeof(T));
  EXPECT_EQ(attn::Weight<T>(w, Storage::BFloat16).memory_bytes(), 30u);
  EXPECT_EQ(attn::Weight<T>(w, Storage::Float16).memory_bytes(), 30u);
  EXPECT_EQ(attn::Weight<T>(w, Storage::Int8).memory_bytes(), 15 + 3 * sizeof(T));
}

// What a type cannot hold is an argument_error naming the element, and changes nothing: int8 needs
// finite values (a NaN or inf has no scale), fp16 |x| < 65520 (70000 would be inf).
TYPED_TEST(WeightTest, RejectsWhatTheTypeCannotHold) {
  using T = TypeParam;
  const attn::Matrix<T> ok = mat<T>({{1, 2, 3}, {4, 5, 6}});
  attn::Matrix<T> nan = ok, big = ok;
  nan(1, 2) = std::numeric_limits<T>::quiet_NaN();
  big(0, 1) = T(70000);
  attn::Weight<T> i8(ok, Storage::Int8), f16(ok, Storage::Float16);
  const attn::Matrix<T> i8_before = i8.matrix(), f16_before = f16.matrix();
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { i8.set(nan); }, {"weight(1, 2)", "int8"}));
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { f16.set(big); }, {"weight(0, 1)", "fp16's range"}));
  EXPECT_TRUE(same_bits<T>(i8.matrix(), i8_before));
  EXPECT_TRUE(same_bits<T>(f16.matrix(), f16_before));
  EXPECT_TRUE(throws_with<attn::shape_error>([&] { i8.set(attn::Matrix<T>::Ones(3, 2)); }, {"[2, 3]", "[3, 2]"}));
  attn::Weight<T> native(big);  // the other types hold it: bf16 has float's range
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { native.set_storage(Storage::Float16); }, {"weight(0, 1)"}));
  EXPECT_EQ(native.storage(), Storage::Native);
  native.set_storage(Storage::BFloat16);
  EXPECT_EQ(native.storage(), Storage::BFloat16);
}

// Linear with a stored weight: forward is T arithmetic on weight() (the stored values): the same
// bits as a Linear in T holding them, on the GEMM path (7 rows) and the few-rows path (1 row) for
// bf16 and fp16, and within T's rounding for int8's few rows. weight() reports the stored values,
// the bias stays in T.
TYPED_TEST(WeightTest, LinearComputesWithTheStoredValues) {
  using T = TypeParam;
  attn::Generator gen(6);
  for (const Storage s : kCompressed) {
    attn::Linear<T> fc(96, 40, /*bias=*/true, gen);
    attn::Linear<T> plain = fc;
    fc.set_storage(s);
    EXPECT_EQ(fc.storage(), s);
    plain.set_weight(fc.weight());
    EXPECT_EQ(plain.storage(), Storage::Native);
    for (const Index n : {1, 7}) {
      attn::Matrix<T> x(n, 96);
      attn::init::uniform(x, -1.0, 1.0, gen);
      const attn::Matrix<T> y = fc.forward(x), want = plain.forward(x);
      if (s == Storage::Int8 && n == 1)
        EXPECT_TRUE(matrices_near(y, want, std::is_same_v<T, float> ? 1e-6 : 1e-14)) << attn::storage_name(s);
      else
        EXPECT_TRUE(same_bits<T>(y, want)) << attn::storage_name(s) << ", " << n << " rows";
    }
  }
}

// set_weight_storage on every module built on projections: the output equals the same module
// holding the stored values in T (its own state dict, loaded into a copy), to 1e-6 relative in
// float - where the kernels are the same bits, exactly. A rejected conversion (an int8 weight
// with a NaN) changes none of the module's weights.
template <class Module, class Forward>
void expect_stored_module(Module m, Forward forward, const char* what) {
  using T = typename std::decay_t<decltype(forward(m))>::Scalar;
  for (const Storage s : kCompressed) {
    Module stored = m;
    stored.set_weight_storage(s);
    if constexpr (std::is_same_v<Module, attn::MultiHeadAttention<T>>) {
      EXPECT_EQ(stored.weight_storage(), s);
    }
    Module plain = m;
    attn::io::load_state_dict(plain, attn::io::state_dict(stored));
    EXPECT_TRUE(matrices_near(forward(stored), forward(plain), std::is_same_v<T, float> ? 1e-6 : 1e-14))
        << what << ", " << attn::storage_name(s);
  }
}

TYPED_TEST(WeightTest, ModulesComputeWithTheStoredValues) {
  using T = TypeParam;
  attn::Generator gen(7);
  attn::Matrix<T> x(6, 32), x1(1, 32);
  attn::init::uniform(x, -1.0, 1.0, gen);
  attn::init::uniform(x1, -1.0, 1.0, gen);
  for (const attn::Matrix<T>* in : {&x, &x1}) {
    const Index B = 1;
    attn::MhaArgs<T> margs;
    margs.batch = B;
    expect_stored_module(
        attn::MultiHeadAttention<T>(32, 4, {}, gen),
        [&](const auto& m) { return m.forward(*in, *in, *in, margs).output; }, "MultiHeadAttention");
    attn::MhaOptions kv;
    kv.kdim = 24, kv.vdim = 16;
    attn::Matrix<T> k(in->rows(), 24), v(in->rows(), 16);
    attn::init::uniform(k, -1.0, 1.0, gen);
    attn::init::uniform(v, -1.0, 1.0, gen);
    expect_stored_module(
        attn::MultiHeadAttention<T>(32, 4, kv, gen), [&](const auto& m) { return m.forward(*in, k, v, margs).output; },
        "MultiHeadAttention, separate q/k/v weights");
    attn::DecoderAttentionOptions dopt;
    dopt.num_kv_heads = 2;
    expect_stored_module(
        attn::DecoderAttention<T>(32, 4, dopt, gen), [&](const auto& m) { return m.forward(*in, B); },
        "DecoderAttention");
    expect_stored_module(
        attn::FeedForward<T>(32, 64, attn::Activation::GELU, true, gen), [&](const auto& m) { return m.forward(*in); },
        "FeedForward");
    expect_stored_module(
        attn::SwiGLU<T>(32, 48, false, gen), [&](const auto& m) { return m.forward(*in); }, "SwiGLU");
    attn::EncoderArgs<T> eargs;
    eargs.batch = B;
    expect_stored_module(
        attn::TransformerEncoderLayer<T>(32, 4, {}, gen), [&](const auto& m) { return m.forward(*in, eargs); },
        "TransformerEncoderLayer");
    expect_stored_module(
        attn::TransformerEncoder<T>(attn::TransformerEncoderLayer<T>(32, 4, {}, gen), 2),
        [&](const auto& m) { return m.forward(*in, eargs); }, "TransformerEncoder");
    attn::DecoderArgs<T> dargs;
    dargs.batch = B;
    expect_stored_module(
        attn::TransformerDecoderLayer<T>(32, 4, {}, gen), [&](const auto& m) { return m.forward(*in, x, dargs); },
        "TransformerDecoderLayer");
  }
}

TYPED_TEST(WeightTest, ModuleConversionIsAllOrNothing) {
  using T = TypeParam;
  attn::Generator gen(8);
  attn::FeedForward<T> ff(8, 16, attn::Activation::ReLU, true, gen);
  attn::Matrix<T> w2 = ff.linear2().weight();
  w2(3, 5) = std::numeric_limits<T>::infinity();
  ff.linear2().set_weight(w2);
  EXPECT_TRUE(throws_with<attn::argument_error>([&] { ff.set_weight_storage(Storage::Int8); }, {"weight(3, 5)"}));
  EXPECT_EQ(ff.linear1().storage(), Storage::Native);
  EXPECT_EQ(ff.linear2().storage(), Storage::Native);
  ff.set_weight_storage(Storage::BFloat16);  // bf16 holds inf
  EXPECT_EQ(ff.linear1().storage(), Storage::BFloat16);
  EXPECT_EQ(ff.linear2().storage(), Storage::BFloat16);
}

// A safetensors file (in memory) of 2-byte elements: the 8-byte header length, the header padded to
// a multiple of 8 bytes with spaces, the data.
attn::io::SafeTensors file_of(const std::string& dtype, Index rows, Index cols,
                              const std::vector<std::uint16_t>& bits) {
  std::string header = "{\"weight\":{\"dtype\":\"" + dtype + "\",\"shape\":[" + std::to_string(rows) + "," +
                       std::to_string(cols) + "],\"data_offsets\":[0," + std::to_string(2 * bits.size()) + "]}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes += char((header.size() >> (8 * i)) & 0xFF);
  bytes += header;
  for (const std::uint16_t b : bits) bytes += char(b & 0xFF), bytes += char(b >> 8);
  return attn::io::SafeTensors::from_bytes(bytes.data(), bytes.size(), "weight_test");
}

// A BF16 tensor loaded into a Linear kept in BFloat16 is used as it is: the Weight is a view of
// the file's bytes (kept alive after the SafeTensors is gone), with the file's values. BF16 bits
// by hand: 0x3F80 = 1, 0xC020 = -2.5, 0x4049 = 3.140625, 0x0000 = 0, 0xBF80 = -1, 0x4000 = 2; so
// W = [[1, -2.5, 3.140625], [0, -1, 2]] and x = [1, 1, 1] gives [1.640625, 1]. Into a Linear in T
// or in Float16 the same tensor is converted as before (3.140625 = 201/64 is an fp16 value too).
TYPED_TEST(WeightTest, Bf16FileLoadsIntoABf16LinearWithoutACopy) {
  using T = TypeParam;
  const attn::Matrix<T> want = mat<T>({{1, -2.5, 3.140625}, {0, -1, 2}});
  for (const Storage s : {Storage::BFloat16, Storage::Native, Storage::Float16}) {
    attn::Linear<T> fc(3, 2, /*bias=*/false);
    fc.set_storage(s);
    {
      const attn::io::SafeTensors st = file_of("BF16", 2, 3, {0x3F80, 0xC020, 0x4049, 0x0000, 0xBF80, 0x4000});
      attn::io::load_state_dict(fc, st);
    }
    EXPECT_EQ(fc.storage(), s);
    EXPECT_EQ(fc.stored_weight().is_view(), s == Storage::BFloat16) << attn::storage_name(s);
    EXPECT_TRUE(same_bits<T>(fc.weight(), want)) << attn::storage_name(s);
    EXPECT_TRUE(matrices_near(fc.forward(mat<T>({{1, 1, 1}})), mat<T>({{1.640625, 1}}), 0)) << attn::storage_name(s);
  }
  // F16 into Float16 likewise: 0x3C00 = 1, 0xC000 = -2, 0x4248 = 3.140625 (1.5703125 * 2).
  attn::Linear<T> fc(3, 1, /*bias=*/false);
  fc.set_storage(Storage::Float16);
  attn::io::load_state_dict(fc, file_of("F16", 1, 3, {0x3C00, 0xC000, 0x4248}));
  EXPECT_TRUE(fc.stored_weight().is_view());
  EXPECT_TRUE(same_bits<T>(fc.weight(), mat<T>({{1, -2, 3.140625}})));
  // set_stored_weight checks the shape.
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] { fc.set_stored_weight(attn::Weight<T>(attn::Matrix<T>::Ones(3, 1))); }, {"[3, 1]", "[1, 3]"}));
  // A wrong shape is the usual shape_error, and changes nothing.
  attn::Linear<T> other(2, 3, /*bias=*/false);
  other.set_storage(Storage::BFloat16);
  const attn::Matrix<T> before = other.weight();
  EXPECT_TRUE(throws_with<attn::shape_error>(
      [&] {
        attn::io::load_state_dict(other, file_of("BF16", 2, 3, {0, 0, 0, 0, 0, 0}));
      },
      {"weight", "[2, 3]"}));
  EXPECT_TRUE(same_bits<T>(other.weight(), before));
}

}  // namespace
