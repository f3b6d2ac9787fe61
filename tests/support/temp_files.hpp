// tests/support/temp_files.hpp - a per-test temporary directory, and the bytes of hand-made
// safetensors files for the attn/io tests.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

namespace attn_test {

// A fresh directory per test (the pid keeps parallel ctest runs apart), removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    dir_ = std::filesystem::temp_directory_path() / ("attn_io_" + std::to_string(::getpid()) + "_" + name);
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::filesystem::path path(const std::string& file = "case.safetensors") const { return dir_ / file; }

  // Writes raw bytes; returns the path.
  std::filesystem::path write_raw(const std::string& bytes, const std::string& file = "case.safetensors") const {
    const auto p = path(file);
    std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
    return p;
  }
  // The 8-byte little-endian header length, the header, the data: a file as the format frames
  // it (whether the header itself is well-formed is up to the test).
  static std::string frame(const std::string& header, const std::string& data) {
    return le64(header.size()) + header + data;
  }
  // header padded with spaces to a multiple of 8 bytes, so that the data starts 8-byte aligned.
  static std::string padded(std::string header) {
    header.append((8 - header.size() % 8) % 8, ' ');
    return header;
  }
  std::filesystem::path write(const std::string& header, const std::string& data,
                              const std::string& file = "case.safetensors") const {
    return write_raw(frame(header, data), file);
  }

  static std::string le64(std::uint64_t n) {
    std::string s;
    for (int i = 0; i < 8; ++i) s += static_cast<char>((n >> (8 * i)) & 0xff);
    return s;
  }
  // The little-endian bytes of each value (F64, F32, or raw 16- and 8-bit patterns).
  template <class T>
  static std::string le(std::initializer_list<T> xs) {
    std::string s;
    for (const T x : xs) {
      unsigned char b[sizeof(T)];
      std::memcpy(b, &x, sizeof(T));
      for (std::size_t i = 0; i < sizeof(T); ++i) s += static_cast<char>(b[i]);  // the test hosts are little-endian
    }
    return s;
  }
  static std::string doubles(std::initializer_list<double> xs) { return le<double>(xs); }
  static std::string floats(std::initializer_list<float> xs) { return le<float>(xs); }

  std::filesystem::path dir_;
};

}  // namespace attn_test
