// encoder_from_pytorch: run a trained torch.nn.TransformerEncoder in C++, from its state_dict.
//
// 1. Export, in Python (the tool writes every submodule's hyperparameters into the file's metadata):
//      torch.save(model, "model.pt")               # a whole model, its encoder at model.encoder
//      attn-export model.pt model.safetensors --dtype float32   (tools/export_state_dict.py)
// 2. Load, in C++: build an attn::TransformerEncoder with the same hyperparameters, then
//      attn::io::load_state_dict(encoder, attn::io::SafeTensors::open("model.safetensors"), "encoder");
//    which sets every parameter by its PyTorch name ("encoder.layers.0.self_attn.in_proj_weight",
//    ...) and checks the hyperparameters the file records against the encoder's.
// 3. Run: encoder.forward(src, args), src [B*L, d_model] in PyTorch's row order.
//
//   encoder_from_pytorch MODEL.safetensors [--prefix PREFIX] [--check IO.safetensors]
//
// --prefix: where the encoder's keys are in the file ("encoder" for keys "encoder.layers.0..."); its
//           hyperparameters are read from the metadata under the same prefix ("encoder.nhead"), or
//           under the plain names ("nhead") when the file has them there (an encoder exported alone).
// --check:  run on IO's tensor "src" (PyTorch's [B, L, E] with batch_first, else [L, B, E]) instead
//           of a random batch, and compare with IO's "output" (PyTorch's); exit status 1 when they
//           differ by more than 1e-4 of the output's scale.
//
// Needs nlohmann_json for attn/io/ (nlohmann-json3-dev).
#include <attn/attn.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

// The file's metadata entry for the encoder's hyperparameter `key` (export_state_dict.py writes
// strings): "<prefix>.<key>", else "<key>", else `fallback`.
std::string metadata_entry(const attn::io::SafeTensors& st, const std::string& prefix, const std::string& key,
                           const char* fallback = nullptr) {
  const std::string full = prefix.empty() ? key : prefix + (prefix.back() == '.' ? "" : ".") + key;
  for (const std::string& k : {full, key}) {
    const auto it = st.metadata().find(k);
    if (it != st.metadata().end()) return it->second;
  }
  if (fallback) return fallback;
  const std::string nor = full == key ? "" : " (nor \"" + key + "\")";
  // A whole model's export has the encoder's under its path: say which prefix would find them.
  for (const auto& [k, value] : st.metadata())
    if (k.size() > key.size() + 1 && k.compare(k.size() - key.size() - 1, key.size() + 1, "." + key) == 0 &&
        k.find(".layers.") == std::string::npos)
      throw std::runtime_error(st.path() + " has no metadata \"" + full + "\"" + nor + ", but has \"" + k +
                               "\": pass --prefix " + k.substr(0, k.size() - key.size() - 1));
  throw std::runtime_error(st.path() + " has no metadata \"" + full + "\"" + nor +
                           ": export it with attn-export (tools/export_state_dict.py) from the module, or add --meta " +
                           full + "=VALUE");
}

// nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, nhead, ...), num_layers, norm), from
// the hyperparameters in the file's metadata, under `prefix`.
attn::TransformerEncoder<float> encoder_from_metadata(const attn::io::SafeTensors& st, const std::string& prefix) {
  const auto meta = [&](const std::string& key, const char* fallback = nullptr) {
    return metadata_entry(st, prefix, key, fallback);
  };
  const attn::Index d_model = std::stol(meta("d_model")), nhead = std::stol(meta("nhead"));
  attn::TransformerOptions opt;
  opt.dim_feedforward = std::stol(meta("dim_feedforward", "2048"));
  const std::string activation = meta("activation", "relu");
  if (activation != "relu" && activation != "gelu")
    throw std::runtime_error("activation \"" + activation + "\": attn has relu and gelu");
  opt.activation = activation == "gelu" ? attn::Activation::GELU : attn::Activation::ReLU;
  opt.layer_norm_eps = std::stod(meta("layer_norm_eps", "1e-05"));
  opt.batch_first = meta("batch_first", "false") == "true";
  opt.norm_first = meta("norm_first", "false") == "true";
  opt.bias = meta("bias", "true") == "true";
  std::optional<attn::LayerNorm<float>> norm;
  if (meta("final_norm", "false") == "true")
    norm.emplace(d_model, std::stod(meta("final_norm_eps", "1e-05")), true, opt.bias);
  return attn::TransformerEncoder<float>(attn::TransformerEncoderLayer<float>(d_model, nhead, opt),
                                         std::stol(meta("num_layers")), norm);
}

int usage() {
  std::cerr << "usage: encoder_from_pytorch MODEL.safetensors [--prefix PREFIX] [--check IO.safetensors]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, prefix, check_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--prefix" && i + 1 < argc)
      prefix = argv[++i];
    else if (arg == "--check" && i + 1 < argc)
      check_path = argv[++i];
    else if (model_path.empty() && arg.rfind("--", 0) != 0)
      model_path = arg;
    else
      return usage();
  }
  if (model_path.empty()) return usage();

  try {
    // 1-2. The encoder, configured as in PyTorch, and every parameter by its state_dict key. Strict:
    // a key missing from the file or left over under the prefix is an error that lists them.
    const auto st = attn::io::SafeTensors::open(model_path);
    attn::TransformerEncoder<float> encoder = encoder_from_metadata(st, prefix);
    attn::io::load_state_dict(encoder, st, prefix);
    const attn::Index E = encoder.d_model();
    const bool batch_first = encoder.num_layers() > 0 && encoder.layer(0).options().batch_first;

    // 3. A batch of B sequences of L tokens: [B*L, E], rows (b, l) with batch_first, else (l, b) -
    // a contiguous PyTorch tensor [B, L, E] or [L, B, E] as it lies in memory.
    attn::Index B = 2, L = 16;
    attn::Matrix<float> src(B * L, E);
    std::optional<attn::io::SafeTensors> io;
    if (!check_path.empty()) {
      io = attn::io::SafeTensors::open(check_path);
      const attn::io::TensorShape shape = io->info("src").shape;
      if (shape.size() != 3 || shape[2] != E || io->info("output").shape != shape)
        throw std::runtime_error(check_path + ": src has shape " + attn::io::to_string(shape) + " and output " +
                                 attn::io::to_string(io->info("output").shape) +
                                 ", expected both [B, L, d_model] or [L, B, d_model], d_model = " + std::to_string(E));
      B = batch_first ? shape[0] : shape[1];
      L = batch_first ? shape[1] : shape[0];
      const attn::io::Tensor<float> t = io->tensor<float>("src");  // F32: a view of the file
      src = Eigen::Map<const attn::Matrix<float>>(t.data(), B * L, E);
    } else {
      attn::Generator gen(0);
      attn::init::normal(src, 1.0, gen);
    }
    attn::EncoderArgs<float> args;
    args.batch = B;  // masks go here too: args.key_padding_mask = attn::IgnoreMask(padding), [B, L]

    const auto start = std::chrono::steady_clock::now();
    const attn::Matrix<float> out = encoder.forward(src, args);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

    std::cout << model_path << ": TransformerEncoder, " << encoder.num_layers() << " layers, d_model " << E
              << ", nhead " << (encoder.num_layers() > 0 ? encoder.layer(0).nhead() : 0)
              << (encoder.norm() ? ", final norm" : "") << "\n"
              << "src    [B*L, d_model] = [" << src.rows() << ", " << src.cols() << "] (B = " << B << ", L = " << L
              << ", " << (batch_first ? "batch_first" : "rows (l, b)") << ")\n"
              << "output [B*L, d_model] = [" << out.rows() << ", " << out.cols() << "] in " << ms << " ms\n";
    const Eigen::IOFormat fmt(5, 0, ", ", "\n", "  [", "]");
    std::cout << "output, first 2 rows, first 6 features:\n"
              << out.topLeftCorner(std::min<attn::Index>(2, out.rows()), std::min<attn::Index>(6, E)).format(fmt)
              << "\n";

    if (io) {
      const attn::io::Tensor<float> t = io->tensor<float>("output");
      const Eigen::Map<const attn::Matrix<float>> want(t.data(), B * L, E);
      const float scale = std::max(1.0f, want.cwiseAbs().maxCoeff());
      const float err = (out - want).cwiseAbs().maxCoeff();
      const bool ok = err <= 1e-4f * scale;
      std::cout << "against PyTorch's output: max |difference| = " << err << (ok ? " (ok)" : " (too large)") << "\n";
      return ok ? 0 : 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "encoder_from_pytorch: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
