// fuzz/replay_main.cpp - runs a fuzz target's LLVMFuzzerTestOneInput on saved inputs, without
// libFuzzer: the normal test suite (any compiler, tools/test.sh and its ASan build) replays each
// target's seed corpus through it, so a change that breaks a seed fails there and not only under
// tools/fuzz.sh.
//
//   safetensors_fuzz_replay fuzz/corpus/safetensors_fuzz crash-1234   // directories and files
//
// Every regular file of a directory is run, in name order. A target reports a failure by
// aborting, as under libFuzzer; this program adds a line naming the input first, and exits 1 when
// an argument cannot be read or names no input at all.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

bool run_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", path.string().c_str());
    return false;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::fprintf(stderr, "replay: %s (%zu bytes)\n", path.string().c_str(), bytes.size());
  // An exact-size copy, as libFuzzer passes it, so that AddressSanitizer sees a read past the end.
  const std::vector<std::uint8_t> exact(bytes.begin(), bytes.end());
  LLVMFuzzerTestOneInput(exact.data(), exact.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <file or directory>...\n", argv[0]);
    return 2;
  }
  std::size_t runs = 0;
  bool ok = true;
  for (int a = 1; a < argc; ++a) {
    const std::filesystem::path arg(argv[a]);
    std::error_code ec;
    if (std::filesystem::is_directory(arg, ec)) {
      std::vector<std::filesystem::path> files;
      for (const auto& e : std::filesystem::directory_iterator(arg, ec))
        if (e.is_regular_file()) files.push_back(e.path());
      if (ec || files.empty()) {
        std::fprintf(stderr, "replay: no inputs in %s\n", arg.string().c_str());
        ok = false;
      }
      std::sort(files.begin(), files.end());
      for (const auto& f : files) {
        ok = run_file(f) && ok;
        ++runs;
      }
    } else {
      ok = run_file(arg) && ok;
      ++runs;
    }
  }
  std::fprintf(stderr, "replay: %zu inputs, %s\n", runs, ok ? "all passed" : "FAILED");
  return ok ? 0 : 1;
}
