// tests/support/fixture_cases.hpp - which fixture files a test binary covers.
//
// A test binary that owns a family of fixtures (say tests/data/layers/encoder_*) registers one test
// per file and then checks that the files and the tests match, so a case added to
// tools/gen_fixtures.py cannot go untested:
//
//   [[maybe_unused]] const bool registered = attn_test::cover("encoder_layer_relu");
//   EXPECT_EQ(attn_test::fixture_files("layers", {"encoder"}), attn_test::covered_cases());
#pragma once

#include <algorithm>
#include <filesystem>
#include <initializer_list>
#include <set>
#include <string>

#include "support/fixture.hpp"

namespace attn_test {

inline std::set<std::string>& covered_cases() {
  static std::set<std::string> names;
  return names;
}

inline bool cover(const std::string& name) {
  covered_cases().insert(name);
  return true;
}

// Case names (file names without ".safetensors") in Fixture::data_dir()/subdir that start with
// one of the prefixes.
inline std::set<std::string> fixture_files(const std::string& subdir, std::initializer_list<const char*> prefixes) {
  std::set<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(Fixture::data_dir() / subdir)) {
    if (!entry.is_regular_file() || entry.path().extension() != ".safetensors") continue;
    const std::string stem = entry.path().stem().string();
    if (std::any_of(prefixes.begin(), prefixes.end(), [&](const char* p) { return stem.rfind(p, 0) == 0; }))
      names.insert(stem);
  }
  return names;
}

}  // namespace attn_test
