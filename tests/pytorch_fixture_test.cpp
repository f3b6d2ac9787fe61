// tests/pytorch_fixture_test.cpp - attn against golden values computed by PyTorch.
//
// tools/gen_fixtures.py writes one tests/data/<case>.safetensors per case (float64 PyTorch 1.13:
// torch.nn.Linear, torch.nn.MultiheadAttention, and SDPA written out in torch ops). Each case
// is a typed test here, run in float and double:
//   PyTorchFixture/double.mha_cross, PyTorchFixture/float.sdpa_combined, ...
// and PyTorchFixtureFiles.EveryFileHasATest fails when a file in tests/data has no test.
//
// Tolerance: max |actual - expected| <= tol * max(1, max |expected|), tol = 1e-10 in double and
// 1e-5 in float (the float run reads the same float64 inputs rounded to float).
// The linear, sdpa and gqa cases run again with Precision::BFloat16, each element held to the
// bound attn/precision.hpp states (bf16_dot_error_bound, bf16_attention_error_bound) plus that
// tolerance. (MHA composes projections and a core: no single bound is stated for it.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "attn/attn.hpp"
#include "support/fixture.hpp"
#include "support/test_util.hpp"

namespace {

using attn::Index;
using attn_test::Fixture;

using attn_test::tolerance;

attn::Causal causal_of(const std::string& s) {
  if (s == "none") return attn::Causal::None;
  if (s == "top_left") return attn::Causal::TopLeft;
  if (s == "bottom_right") return attn::Causal::BottomRight;
  throw std::runtime_error("unknown causal alignment \"" + s + "\" in a fixture");
}

// The causal rule written out again here, independently of the library: may query i see key j?
bool causal_sees(attn::Causal c, Index i, Index j, Index L, Index S) {
  if (c == attn::Causal::TopLeft) return j <= i;
  if (c == attn::Causal::BottomRight) return j <= i + S - L;
  return true;
}

// --- Precision::BFloat16 against PyTorch's results: within the stated bounds ---------------------

// y [N, out] from x [N, in] and W [out, in] in bf16 compute: each element within
// bf16_dot_error_bound of PyTorch's y (attn/precision.hpp), plus T's tolerance for the rest.
template <class T>
void expect_bf16_linear(const attn::Matrix<T>& y, const attn::Matrix<double>& want, const attn::Matrix<T>& x,
                        const attn::Matrix<T>& w) {
  ASSERT_EQ(y.rows(), want.rows());
  ASSERT_EQ(y.cols(), want.cols());
  for (Index r = 0; r < y.rows(); ++r)
    for (Index c = 0; c < y.cols(); ++c) {
      const double abs_dot = (x.row(r).cwiseAbs().template cast<double>().array() *
                              w.row(c).cwiseAbs().template cast<double>().array())
                                 .sum();
      const double bound = double(attn::bf16_dot_error_bound<T>(T(abs_dot), x.cols())) +
                           tolerance<T>() * std::max(1.0, std::abs(want(r, c)));
      EXPECT_LE(std::abs(double(y(r, c)) - want(r, c)), bound) << "bf16 y(" << r << ", " << c << ")";
    }
}

// out [L, H*dv] from q [L, H*d], k [S, Hkv*d], v [S, Hkv*dv] in bf16 compute: each row of each head
// within bf16_attention_error_bound of PyTorch's output (max|k|, max|v| over all heads: a
// larger bound than the head's own, still the stated one), plus T's tolerance.
template <class T>
void expect_bf16_attention(const attn::Matrix<T>& out, const attn::Matrix<double>& want, const attn::Matrix<T>& q,
                           const attn::Matrix<T>& k, const attn::Matrix<T>& v, Index H, double scale) {
  ASSERT_EQ(out.rows(), want.rows());
  ASSERT_EQ(out.cols(), want.cols());
  const Index d = q.cols() / H, dv = out.cols() / H;
  const double max_k = double(k.cwiseAbs().maxCoeff()), max_v = double(v.cwiseAbs().maxCoeff());
  for (Index i = 0; i < out.rows(); ++i)
    for (Index h = 0; h < H; ++h) {
      const double l1 = double(q.row(i).segment(h * d, d).cwiseAbs().sum());
      const double bound = double(attn::bf16_attention_error_bound<T>(T(std::abs(scale) * l1), T(max_k), T(max_v),
                                                                      k.rows(), d));
      for (Index e = h * dv; e < (h + 1) * dv; ++e)
        EXPECT_LE(std::abs(double(out(i, e)) - want(i, e)), bound + tolerance<T>() * std::max(1.0, std::abs(want(i, e))))
            << "bf16 output (" << i << ", " << e << ")";
    }
}

// --- linear -----------------------------------------------------------------------------------

template <class T>
void run_linear(const Fixture& f) {
  const bool bias = f.meta_bool("bias");
  attn::Linear<T> fc(f.meta_int("in_features"), f.meta_int("out_features"), bias);
  fc.set_weight(f.tensor<T>("weight"));
  if (bias) fc.set_bias(f.vec<T>("bias"));
  EXPECT_TRUE(attn_test::matrices_near(fc.forward(f.tensor<T>("x")), f.tensor<double>("y"), tolerance<T>())) << "y";
  fc.set_precision(attn::Precision::BFloat16);
  expect_bf16_linear<T>(fc.forward(f.tensor<T>("x")), f.tensor<double>("y"), f.tensor<T>("x"), f.tensor<T>("weight"));
}

// --- scaled dot-product attention --------------------------------------------------------------

template <class T>
void run_sdpa(const Fixture& f) {
  const attn::Matrix<T> q = f.tensor<T>("query"), k = f.tensor<T>("key"), v = f.tensor<T>("value");
  attn::Masks<T> m;
  ASSERT_FALSE(f.has("attn_mask_attend") && f.has("attn_mask_ignore")) << "a case has one bool attn_mask";
  if (f.has("attn_mask_attend")) m.attn_mask = attn::AttendMask(f.mask("attn_mask_attend"));
  if (f.has("attn_mask_ignore")) m.attn_mask = attn::IgnoreMask(f.mask("attn_mask_ignore"));
  if (f.has("attn_bias")) m.attn_bias = attn::AdditiveMask<T>(f.tensor<T>("attn_bias"));
  if (f.has("key_padding_mask")) m.key_padding_mask = attn::IgnoreMask(f.mask("key_padding_mask"));
  m.causal = causal_of(f.meta("causal"));  // on top of the stored masks

  const attn::ScaledDotProductAttention<T> sdpa =
      f.meta("scale") == "default" ? attn::ScaledDotProductAttention<T>()
                                   : attn::ScaledDotProductAttention<T>(static_cast<T>(f.meta_double("scale")));
  const attn::Matrix<double> want_out = f.tensor<double>("output"), want_w = f.tensor<double>("weights");

  const auto r = sdpa.forward_with_weights(q, k, v, m);
  EXPECT_TRUE(attn_test::matrices_near(r.output, want_out, tolerance<T>())) << "output";
  EXPECT_TRUE(attn_test::matrices_near(r.weights, want_w, tolerance<T>())) << "weights";
  EXPECT_TRUE(attn_test::matrices_near(sdpa.forward(q, k, v, m), want_out, tolerance<T>())) << "forward() output";
  m.precision = attn::Precision::BFloat16;
  expect_bf16_attention<T>(sdpa.forward(q, k, v, m), want_out, q, k, v, 1,
                           sdpa.scale() ? double(*sdpa.scale()) : 1.0 / std::sqrt(double(q.cols())));

  // All-masked rows (sdpa_all_masked_row, bottom-right with L > S, ...) are zeros in PyTorch 2.x
  // and in attn; the expectation holds exactly that many zero weight rows.
  Index zero_rows = 0;
  for (Index i = 0; i < want_w.rows(); ++i) zero_rows += want_w.row(i).isZero(0) ? 1 : 0;
  EXPECT_EQ(zero_rows, f.meta_int("all_masked_rows"));
}

// --- grouped-query attention with the score options, and RoPE ----------------------------------

attn::RopeStyle rope_style_of(const std::string& s) {
  if (s == "neox") return attn::RopeStyle::NeoX;
  if (s == "gptj") return attn::RopeStyle::GPTJ;
  throw std::runtime_error("unknown rope style \"" + s + "\"");
}

// The cases written with attention sinks (gqa_sink*, gqa_lse_*) also hold B sequences (metadata
// batch), sink_tokens, the sinks [H] when used, and lse [H, B*L] (gpt-oss's reference: a column of
// sinks[h] concatenated to the logits, softmax, the column dropped; lse over the concatenated row).
// The older files have none of these: B = 1, sink_tokens = 0, no lse to check.
template <class T>
void run_gqa(const Fixture& f) {
  const Index H = f.meta_int("heads"), Hkv = f.meta_int("kv_heads"), L = f.meta_int("L"), S = f.meta_int("S");
  const Index B = f.has_meta("batch") ? f.meta_int("batch") : 1;
  attn::Matrix<T> q = f.tensor<T>("query"), k = f.tensor<T>("key");
  const attn::Matrix<T> v = f.tensor<T>("value");
  if (f.meta("rope") != "none") {  // a decoding step: keys at 0..S-1, queries at S-L..S-1
    const attn::RopeCache<T> rope(f.meta_int("d"), S,
                                  {f.meta_int("rope_dim"), f.meta_double("rope_base"), rope_style_of(f.meta("rope"))});
    rope.apply(q, H, B, S - L);
    attn::apply_rope<T>(k, Hkv, B, 0, rope);
  }
  attn::GqaArgs<T> args;
  args.batch = B;
  args.causal = causal_of(f.meta("causal"));
  args.window = f.meta_int("window");
  args.softcap = static_cast<T>(f.meta_double("softcap"));
  if (f.has("alibi_slopes")) {
    args.alibi_slopes = f.vec<T>("alibi_slopes");
    // The file's slopes are the ALiBi paper's get_slopes, computed in Python: attn's are the same.
    EXPECT_TRUE(attn_test::matrices_near(attn::alibi_slopes<T>(H), f.vec<double>("alibi_slopes"), tolerance<T>()));
  }
  if (f.has("sinks")) args.sinks = f.vec<T>("sinks");
  if (f.has_meta("sink_tokens")) args.sink_tokens = f.meta_int("sink_tokens");
  const attn::Matrix<double> want_out = f.tensor<double>("output");
  if (f.has_meta("all_masked_rows")) {  // the case covers what it says: rows (b, l) with no key are zeros
    Index zero_rows = 0;
    for (Index r = 0; r < want_out.rows(); ++r) zero_rows += want_out.row(r).isZero(0) ? 1 : 0;
    EXPECT_EQ(zero_rows, f.meta_int("all_masked_rows"));
  }
  const attn::GroupedQueryAttention<T> gqa(H, Hkv);
  EXPECT_TRUE(attn_test::matrices_near(gqa.forward(q, k, v, args), want_out, tolerance<T>())) << "output";
  if (f.has("lse")) {
    const attn::AttentionLse<T> r = gqa.forward_with_lse(q, k, v, args);
    EXPECT_TRUE(attn_test::matrices_near(r.output, want_out, tolerance<T>())) << "forward_with_lse output";
    EXPECT_TRUE(attn_test::matrices_near(r.lse, f.tensor<double>("lse"), tolerance<T>())) << "lse";
  }
  args.precision = attn::Precision::BFloat16;
  expect_bf16_attention<T>(gqa.forward(q, k, v, args), want_out, q, k, v, H, 1.0 / std::sqrt(double(q.cols() / H)));
}

template <class T>
void run_rope(const Fixture& f) {
  attn::Matrix<T> x = f.tensor<T>("x");
  const attn::RopeCache<T> rope(f.meta_int("head_dim"), 64,
                                {f.meta_int("rope_dim"), f.meta_double("rope_base"), rope_style_of(f.meta("style"))});
  rope.apply(x, f.meta_int("heads"), 1, f.meta_int("start"));
  EXPECT_TRUE(attn_test::matrices_near(x, f.tensor<double>("output"), tolerance<T>())) << "start";
  // The same positions given one by one.
  attn::Matrix<T> y = f.tensor<T>("x");
  const Eigen::Matrix<Index, Eigen::Dynamic, 1> positions =
      Eigen::Matrix<Index, Eigen::Dynamic, 1>::LinSpaced(y.rows(), f.meta_int("start"), f.meta_int("start") + y.rows() - 1);
  rope.apply(y, f.meta_int("heads"), positions);
  EXPECT_TRUE(x == y) << "positions";
}

// --- multi-head attention ----------------------------------------------------------------------

// PyTorch 1.13's nn.MultiheadAttention returns NaN for a query whose keys are all masked (the
// softmax of a row of -inf is 0/0). attn returns zero attention there, on purpose (PyTorch 2.x
// SDPA, ONNX and oneDNN do the same; see PYTORCH_SEMANTICS.md, "Outputs"): every head's output is
// 0, so the module's output row is out_proj(0) = out_proj.bias (0 without bias), and the row of
// weights is 0. This rewrites torch's NaN rows into that expectation and returns how many it
// rewrote; a row with some NaN but not all would be a different bug and fails here.
Index expect_zero_attention_for_nan_rows(attn::Matrix<double>& want, const attn::Vector<double>& fill) {
  Index rewritten = 0;
  for (Index r = 0; r < want.rows(); ++r) {
    const Index nans = want.row(r).array().isNaN().count();
    if (nans == 0) continue;
    EXPECT_EQ(nans, want.cols()) << "row " << r << " of the PyTorch result is partly NaN";
    want.row(r) = fill.transpose();
    ++rewritten;
  }
  return rewritten;
}

template <class T>
void run_mha(const Fixture& f) {
  const Index E = f.meta_int("embed_dim"), H = f.meta_int("num_heads");
  attn::MhaOptions o;
  o.kdim = f.meta_int("kdim");
  o.vdim = f.meta_int("vdim");
  o.bias = f.meta_bool("bias");
  o.add_bias_kv = f.meta_bool("add_bias_kv");
  o.add_zero_attn = f.meta_bool("add_zero_attn");
  o.batch_first = f.meta_bool("batch_first");
  attn::MultiHeadAttention<T> mha(E, H, o);

  // Parameters under their state_dict names.
  ASSERT_EQ(mha.packed(), f.has("in_proj_weight")) << "PyTorch and attn disagree on packed in_proj_weight";
  if (mha.packed()) {
    mha.set_in_proj_weight(f.tensor<T>("in_proj_weight"));
  } else {
    mha.set_q_proj_weight(f.tensor<T>("q_proj_weight"));
    mha.set_k_proj_weight(f.tensor<T>("k_proj_weight"));
    mha.set_v_proj_weight(f.tensor<T>("v_proj_weight"));
  }
  mha.out_proj().set_weight(f.tensor<T>("out_proj.weight"));
  ASSERT_EQ(o.bias, f.has("in_proj_bias"));
  ASSERT_EQ(o.bias, f.has("out_proj.bias"));
  attn::Vector<double> out_bias = attn::Vector<double>::Zero(E);
  if (o.bias) {
    mha.set_in_proj_bias(f.vec<T>("in_proj_bias"));
    mha.out_proj().set_bias(f.vec<T>("out_proj.bias"));
    out_bias = f.vec<double>("out_proj.bias");
  }
  ASSERT_EQ(o.add_bias_kv, f.has("bias_k"));
  if (o.add_bias_kv) {
    mha.set_bias_k(f.vec<T>("bias_k"));
    mha.set_bias_v(f.vec<T>("bias_v"));
  }

  const attn::Matrix<T> q = f.tensor<T>("query"), k = f.tensor<T>("key"), v = f.tensor<T>("value");
  attn::MhaArgs<T> args;
  args.batch = f.meta_int("batch");
  args.need_weights = f.meta_bool("need_weights");
  args.average_attn_weights = f.meta_bool("average_attn_weights");
  if (f.has("attn_bias")) args.attn_bias = attn::AdditiveMask<T>(f.tensor<T>("attn_bias"));
  if (f.has("key_padding_mask")) args.key_padding_mask = attn::IgnoreMask(f.mask("key_padding_mask"));
  const attn::BoolMatrix bool_mask = f.has("attn_mask_ignore") ? f.mask("attn_mask_ignore") : attn::BoolMatrix();

  attn::Matrix<double> want_out = f.tensor<double>("output");
  attn::Matrix<double> want_w = args.need_weights ? f.tensor<double>("weights") : attn::Matrix<double>();
  const Index nan_rows = expect_zero_attention_for_nan_rows(want_out, out_bias) +
                         expect_zero_attention_for_nan_rows(want_w, attn::Vector<double>::Zero(want_w.cols()));
  EXPECT_EQ(nan_rows > 0, f.meta_bool("torch_output_has_nan"));

  const auto check = [&](const attn::MhaArgs<T>& a, const std::string& how) {
    SCOPED_TRACE(how);
    const auto [out, weights] = mha.forward(q, k, v, a);
    EXPECT_TRUE(attn_test::matrices_near(out, want_out, tolerance<T>())) << "output";
    if (a.need_weights) {
      EXPECT_TRUE(attn_test::matrices_near(weights, want_w, tolerance<T>())) << "weights";
    } else {
      EXPECT_EQ(weights.size(), 0) << "weights were not asked for";
    }
    attn::MhaArgs<T> no_weights = a;
    no_weights.need_weights = false;
    attn::Matrix<T> out_into(q.rows(), E);
    mha.forward_into(q, k, v, no_weights, out_into);
    EXPECT_TRUE(attn_test::matrices_near(out_into, want_out, tolerance<T>())) << "forward_into output";
  };

  const attn::Causal causal = causal_of(f.meta("causal"));
  if (f.meta_bool("attn_mask_is_causal")) {
    // PyTorch needs the causal mask spelled out; attn takes the alignment instead. Both must give
    // PyTorch's answer, and the stored mask must be exactly the causal one the metadata names.
    ASSERT_NE(causal, attn::Causal::None);
    ASSERT_EQ(bool_mask.cols(), f.meta_int("src_len"));
    ASSERT_EQ(bool_mask.rows(), f.meta_int("tgt_len"));
    const Index L = bool_mask.rows(), S = bool_mask.cols();
    for (Index i = 0; i < L; ++i)
      for (Index j = 0; j < S; ++j)
        ASSERT_EQ(bool_mask(i, j), !causal_sees(causal, i, j, L, S)) << "stored causal mask at (" << i << ", " << j << ")";
    attn::MhaArgs<T> with_causal = args;
    with_causal.causal = causal;
    check(with_causal, "attn::Causal instead of the mask");
  } else {
    ASSERT_EQ(causal, attn::Causal::None) << "an MHA case with causal metadata must store its mask";
  }
  if (bool_mask.size() > 0) args.attn_mask = attn::IgnoreMask(bool_mask);
  check(args, "PyTorch's masks");
}

// --- the cases ----------------------------------------------------------------------------------

template <class T>
void run_case(const std::string& name) {
  const Fixture f = Fixture::load(name + ".safetensors");
  SCOPED_TRACE(f.path() + ": " + f.meta("description"));
  ASSERT_EQ(f.meta("case"), name);
  const std::string& kind = f.meta("kind");
  if (kind == "linear") {
    run_linear<T>(f);
  } else if (kind == "sdpa") {
    run_sdpa<T>(f);
  } else if (kind == "gqa") {
    run_gqa<T>(f);
  } else if (kind == "rope") {
    run_rope<T>(f);
  } else if (kind == "mha") {
    run_mha<T>(f);
  } else {
    FAIL() << "unknown kind \"" << kind << "\"";
  }
  EXPECT_EQ(f.unused(), std::vector<std::string>{}) << "tensors of the fixture that the test never read";
}

std::set<std::string>& covered_cases() {
  static std::set<std::string> names;
  return names;
}

bool cover(const char* name) {
  covered_cases().insert(name);
  return true;
}

template <class T>
class PyTorchFixture : public ::testing::Test {};
TYPED_TEST_SUITE(PyTorchFixture, attn_test::Scalars, attn_test::ScalarName);

// One typed test per fixture file, named after it.
#define ATTN_PYTORCH_CASE(case_name)                                                    \
  [[maybe_unused]] const bool attn_pytorch_case_##case_name = cover(#case_name);        \
  TYPED_TEST(PyTorchFixture, case_name) { run_case<TypeParam>(#case_name); }

ATTN_PYTORCH_CASE(linear_bias)
ATTN_PYTORCH_CASE(linear_no_bias)

ATTN_PYTORCH_CASE(sdpa_plain)
ATTN_PYTORCH_CASE(sdpa_custom_scale)
ATTN_PYTORCH_CASE(sdpa_bool_attend)
ATTN_PYTORCH_CASE(sdpa_bool_ignore)
ATTN_PYTORCH_CASE(sdpa_additive_bias)
ATTN_PYTORCH_CASE(sdpa_causal_top_left_l_lt_s)
ATTN_PYTORCH_CASE(sdpa_causal_top_left_l_gt_s)
ATTN_PYTORCH_CASE(sdpa_causal_bottom_right_l_lt_s)
ATTN_PYTORCH_CASE(sdpa_causal_bottom_right_l_gt_s)
ATTN_PYTORCH_CASE(sdpa_key_padding)
ATTN_PYTORCH_CASE(sdpa_combined)
ATTN_PYTORCH_CASE(sdpa_all_masked_row)
ATTN_PYTORCH_CASE(sdpa_large_logits)

ATTN_PYTORCH_CASE(gqa_group2_causal)
ATTN_PYTORCH_CASE(gqa_mqa)
ATTN_PYTORCH_CASE(gqa_alibi_8_heads)
ATTN_PYTORCH_CASE(gqa_window_causal)
ATTN_PYTORCH_CASE(gqa_window_bidirectional)
ATTN_PYTORCH_CASE(gqa_softcap)
ATTN_PYTORCH_CASE(gqa_rope_neox_decode)
ATTN_PYTORCH_CASE(gqa_sinks)
ATTN_PYTORCH_CASE(gqa_sink_tokens_window)
ATTN_PYTORCH_CASE(gqa_sinks_window_sink_tokens_softcap)
ATTN_PYTORCH_CASE(gqa_sinks_all_masked_rows)
ATTN_PYTORCH_CASE(gqa_lse_all_masked_rows)
ATTN_PYTORCH_CASE(rope_neox)
ATTN_PYTORCH_CASE(rope_neox_partial)
ATTN_PYTORCH_CASE(rope_gptj)

ATTN_PYTORCH_CASE(mha_self_unbatched)
ATTN_PYTORCH_CASE(mha_batch_first)
ATTN_PYTORCH_CASE(mha_seq_first)
ATTN_PYTORCH_CASE(mha_cross)
ATTN_PYTORCH_CASE(mha_kdim_vdim)
ATTN_PYTORCH_CASE(mha_no_bias)
ATTN_PYTORCH_CASE(mha_add_bias_kv)
ATTN_PYTORCH_CASE(mha_add_zero_attn)
ATTN_PYTORCH_CASE(mha_bias_kv_zero_attn_masks)
ATTN_PYTORCH_CASE(mha_bool_mask_2d)
ATTN_PYTORCH_CASE(mha_bool_mask_3d)
ATTN_PYTORCH_CASE(mha_float_mask)
ATTN_PYTORCH_CASE(mha_float_mask_3d_key_padding)
ATTN_PYTORCH_CASE(mha_key_padding)
ATTN_PYTORCH_CASE(mha_weights_per_head)
ATTN_PYTORCH_CASE(mha_no_weights)
ATTN_PYTORCH_CASE(mha_causal_top_left)
ATTN_PYTORCH_CASE(mha_causal_bottom_right)
ATTN_PYTORCH_CASE(mha_all_keys_padded)
ATTN_PYTORCH_CASE(mha_all_keys_padded_zero_attn)
ATTN_PYTORCH_CASE(mha_large)

TEST(PyTorchFixtureFiles, EveryFileHasATest) {
  const std::vector<std::string> files = Fixture::list();
  EXPECT_FALSE(files.empty()) << "no fixtures in " << Fixture::data_dir() << "; run tools/gen_fixtures.py";
  for (const std::string& name : files)
    EXPECT_TRUE(covered_cases().count(name)) << name << ".safetensors has no test: add ATTN_PYTORCH_CASE(" << name
                                             << ") to " << __FILE__;
  for (const std::string& name : covered_cases())
    EXPECT_TRUE(std::find(files.begin(), files.end(), name) != files.end())
        << "ATTN_PYTORCH_CASE(" << name << ") has no file " << name << ".safetensors in " << Fixture::data_dir();
}

// --- the reader itself --------------------------------------------------------------------------

class FixtureReader : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("attn_fixture_reader_" + std::to_string(::getpid()) + "_" + info->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Writes raw bytes; returns the path.
  std::filesystem::path write_raw(const std::string& bytes) const {
    const auto p = dir_ / "case.safetensors";
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  // A well-formed frame around `header` and `data`, unless header_len overrides the length field.
  std::filesystem::path write(const std::string& header, const std::string& data,
                              std::uint64_t header_len = ~std::uint64_t(0)) const {
    const std::uint64_t n = header_len == ~std::uint64_t(0) ? header.size() : header_len;
    std::string bytes;
    for (int i = 0; i < 8; ++i) bytes += static_cast<char>((n >> (8 * i)) & 0xff);
    return write_raw(bytes + header + data);
  }
  static std::string doubles(std::initializer_list<double> xs) {
    std::string s;
    for (double x : xs) {
      std::uint64_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      for (int i = 0; i < 8; ++i) s += static_cast<char>((bits >> (8 * i)) & 0xff);
    }
    return s;
  }
  // Loading must throw a runtime_error whose message contains `needle`.
  static void expect_error(const std::filesystem::path& p, const std::string& needle,
                           const std::string& accessor = "") {
    try {
      const Fixture f = Fixture::load_path(p);
      if (accessor == "tensor") (void)f.tensor<double>("x");
      if (accessor == "vec") (void)f.vec<double>("x");
      if (accessor == "mask") (void)f.mask("m");
      if (accessor == "meta_int") (void)f.meta_int("k");
      ADD_FAILURE() << "no error; expected one mentioning \"" << needle << "\"";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }

  std::filesystem::path dir_;
};

TEST_F(FixtureReader, ReadsTensorsMasksAndMetadata) {
  const std::string header =
      R"({"x":{"dtype":"F64","shape":[2,2],"data_offsets":[0,32]},)"
      R"("b":{"dtype":"F64","shape":[2],"data_offsets":[32,48]},)"
      R"("m":{"dtype":"BOOL","shape":[1,3],"data_offsets":[48,51]},)"
      R"("__metadata__":{"k":"12","on":"true","s":"0.25"}})";
  const std::string data = doubles({1.5, -2, 0.25, 1e300}) + doubles({3, -0.0}) + std::string("\x01\x00\x01", 3);
  const Fixture f = Fixture::load_path(write(header + "   ", data));  // header padding is allowed
  const attn::Matrix<double> x = f.tensor<double>("x");
  EXPECT_EQ(x(0, 0), 1.5);
  EXPECT_EQ(x(0, 1), -2);
  EXPECT_EQ(x(1, 0), 0.25);  // row-major
  EXPECT_EQ(x(1, 1), 1e300);
  EXPECT_TRUE(std::isinf(f.tensor<float>("x")(1, 1)));  // converted to float: overflows, as a cast does
  EXPECT_EQ(f.vec<double>("b")(0), 3);
  const attn::BoolMatrix m = f.mask("m");
  EXPECT_TRUE(m(0, 0) && !m(0, 1) && m(0, 2));
  EXPECT_EQ(f.meta_int("k"), 12);
  EXPECT_TRUE(f.meta_bool("on"));
  EXPECT_EQ(f.meta_double("s"), 0.25);
  EXPECT_TRUE(f.has("b"));
  EXPECT_FALSE(f.has("c"));
  EXPECT_EQ(f.unused(), std::vector<std::string>{});
  EXPECT_THROW((void)f.meta("missing"), std::runtime_error);
  EXPECT_THROW((void)f.meta_int("s"), std::runtime_error);
  EXPECT_THROW((void)f.tensor<double>("b"), std::runtime_error);  // 1-D: use vec
  EXPECT_THROW((void)f.vec<double>("x"), std::runtime_error);     // 2-D: use tensor
  EXPECT_THROW((void)f.mask("x"), std::runtime_error);            // not BOOL
  EXPECT_THROW((void)f.tensor<double>("m"), std::runtime_error);  // not a float
  EXPECT_THROW((void)f.tensor<double>("missing"), std::runtime_error);
}

// The file format's own checks are attn::io::SafeTensors' (tests/safetensors_test.cpp); these are
// the fixtures' rules on top, and the reader's errors as they reach a fixture test.
TEST_F(FixtureReader, RejectsWhatTheFixturesForbid) {
  expect_error(dir_ / "absent.safetensors", "cannot open");
  expect_error(write_raw("abc"), "shorter than the 8-byte header length");
  expect_error(write(R"({"x":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", doubles({1})), "needs 16");
  expect_error(write(R"({"__metadata__":{"k":3}})", ""), "not a string");
  expect_error(write(R"({"__metadata__":{"k":"3x"}})", ""), "is not an integer", "meta_int");
  expect_error(write(R"({"m":{"dtype":"BOOL","shape":[1,1],"data_offsets":[0,1]}})", "\x02"), "BOOL is 0 or 1",
               "mask");
  expect_error(write(R"({"m":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}})", "\x01"), "1 dimensions, expected 2",
               "mask");
  expect_error(write(R"({"x":{"dtype":"I64","shape":[1,1],"data_offsets":[0,8]}})", doubles({1})),
               "not a floating-point type", "tensor");
  expect_error(write(R"({"x":{"dtype":"F64","shape":[1,1],"data_offsets":[0,8]}})", doubles({1})),
               "2 dimensions, expected 1 (use tensor<T>() for matrices)", "vec");
}

}  // namespace
