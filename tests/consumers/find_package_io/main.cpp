// A user's program on an installed attn with its io component: a module's state_dict written as a
// safetensors file with its hyperparameters, read back into another module, checked on the way.
#include <attn/attn.hpp>
#include <attn/io/safetensors.hpp>
#include <attn/io/state_dict.hpp>

#include <filesystem>
#include <iostream>
#include <string>

int main() {
  const std::filesystem::path path = std::filesystem::temp_directory_path() / "attn_consumer_io.safetensors";
  attn::Generator gen(3);
  const attn::MultiHeadAttention<float> saved(8, 2, attn::MhaOptions{}, gen);
  attn::io::save_safetensors(path, attn::io::state_dict(saved, "attn"),
                             attn::io::hyperparameter_metadata(saved, "attn"));

  const attn::io::SafeTensors st = attn::io::SafeTensors::open(path);
  attn::MultiHeadAttention<float> loaded(8, 2);
  attn::io::load_state_dict(loaded, st, "attn");
  bool refused = false;
  try {
    attn::MultiHeadAttention<float> four_heads(8, 4);  // the same shapes; the metadata says 2 heads
    attn::io::load_state_dict(four_heads, st, "attn");
  } catch (const attn::format_error& e) {
    refused = std::string(e.what()).find("build it with 2 heads") != std::string::npos;
  }
  std::filesystem::remove(path);

  std::cout << "attn " << ATTN_VERSION_STRING << ": " << st.names().size() << " tensors, "
            << st.metadata().size() << " metadata entries\n";
  if (loaded.in_proj_weight() != saved.in_proj_weight() || loaded.out_proj().bias() != saved.out_proj().bias()) {
    std::cerr << "the loaded parameters differ from the saved ones\n";
    return 1;
  }
  if (!refused) {
    std::cerr << "a 4-head module loaded a 2-head file\n";
    return 1;
  }
  return 0;
}
