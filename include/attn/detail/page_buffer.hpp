// attn/detail/page_buffer.hpp - a zeroed byte buffer for large, long-lived arrays that kernels
// stream through (the KV cache): aligned to 64 bytes, and from 2 MiB up aligned to 2 MiB and
// offered to the kernel as transparent huge pages (madvise(MADV_HUGEPAGE), Linux; a hint, ignored
// where huge pages are off). A decoding step streams the whole cache once, and with 4 KiB pages
// it crosses a page - a TLB miss and a page walk - every 64 cache lines; with 2 MiB pages, every
// 32768 (bench/RESULTS.md measures the difference).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attn::detail {

class PageBuffer {
 public:
  static constexpr std::size_t kHugePage = std::size_t(2) << 20;

  PageBuffer() = default;
  explicit PageBuffer(std::size_t bytes) : size_(bytes) {
    if (bytes == 0) return;
    const std::size_t align = bytes >= kHugePage ? kHugePage : 64;
    const std::size_t rounded = (bytes + align - 1) / align * align;  // aligned_alloc wants a multiple
    void* p = std::aligned_alloc(align, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);  // before the first touch below
#endif
    std::memset(p, 0, rounded);
    data_.reset(static_cast<unsigned char*>(p));
  }
  PageBuffer(const PageBuffer& o) : PageBuffer(o.size_) {
    if (size_) std::memcpy(data_.get(), o.data_.get(), size_);
  }
  PageBuffer& operator=(const PageBuffer& o) {
    if (this != &o) *this = PageBuffer(o);
    return *this;
  }
  PageBuffer(PageBuffer&& o) noexcept : data_(std::move(o.data_)), size_(std::exchange(o.size_, 0)) {}
  PageBuffer& operator=(PageBuffer&& o) noexcept {
    data_ = std::move(o.data_);
    size_ = std::exchange(o.size_, 0);
    return *this;
  }
  ~PageBuffer() = default;

  unsigned char* data() { return data_.get(); }
  const unsigned char* data() const { return data_.get(); }
  std::size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char[], Free> data_;
  std::size_t size_ = 0;
};

}  // namespace attn::detail
