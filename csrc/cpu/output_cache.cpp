#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <new>
#include <string>

#include "checks.h"

namespace distillkit::cpu {
namespace {

constexpr size_t kMinCached = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;
// Fresh blocks from this size are advised onto transparent huge pages (with
// THP "madvise", a common default, only advised memory gets them): 256 faults
// instead of 128k for a 512 MiB gradient. Below it the advice measured
// bimodal on first touch (a 67 MB gradient: 21 ms once warm, ~90 ms for the
// first calls of a process), and a cached block is faulted in only once anyway.
constexpr size_t kHugePagesMin = size_t(128) << 20;

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
    const char* env = std::getenv("DISTILLKIT_CPU_CACHE_MB");
    size_t mb = 2048;
    if (env != nullptr && *env != '\0') {
      // Digits only: strtoull alone would skip blanks, wrap " -5" to a huge value and saturate
      // on overflow; and the MiB count must fit in size_t once shifted to bytes.
      bool digits = true;
      for (const char* c = env; *c != '\0'; ++c) digits = digits && *c >= '0' && *c <= '9';
      errno = 0;
      mb = digits ? std::strtoull(env, nullptr, 10) : 0;
      TORCH_CHECK(digits && errno == 0 && mb <= (SIZE_MAX >> 20), "distillkit: "
                  "DISTILLKIT_CPU_CACHE_MB must be a non-negative integer (MiB) of at most ",
                  SIZE_MAX >> 20, ", got '", env, "'");
    }
    capacity_ = mb << 20;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = (std::max(n, size_t(1)) + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(size);
    if (block == nullptr) block = fresh(size);
    return {block->ptr, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t release() {
    std::list<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      cached_ = 0;
    }
    int64_t bytes = 0;
    for (Block* b : drop) {
      bytes += static_cast<int64_t>(b->size);
      destroy(b);
    }
    return bytes;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

 private:
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Newest first: its pages are the likeliest to be in cache.
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if ((*it)->size == size) {
        Block* b = *it;
        free_.erase(std::next(it).base());
        cached_ -= size;
        return b;
      }
    }
    return nullptr;
  }

  static Block* fresh(size_t size) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, size) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (size >= kHugePagesMin) madvise(ptr, size, MADV_HUGEPAGE);  // advice only: ignore failure
#endif
    return new Block{ptr, size};
  }

  static void destroy(Block* b) {
    std::free(b->ptr);
    delete b;
  }

  static void give_back(void* ctx);

  void put(Block* b) {
    std::list<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b->size > capacity_) {
        drop.push_back(b);
      } else {
        free_.push_back(b);
        cached_ += b->size;
        while (cached_ > capacity_) {
          cached_ -= free_.front()->size;
          drop.push_back(free_.front());
          free_.pop_front();
        }
      }
    }
    for (Block* d : drop) destroy(d);
  }

  size_t capacity_;
  std::mutex mutex_;
  std::list<Block*> free_;  // oldest first
  size_t cached_ = 0;
};

// Never destroyed: tensors may be freed during interpreter teardown, after
// static destructors have run.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

void OutputCache::give_back(void* ctx) { cache().put(static_cast<Block*>(ctx)); }

// An uninitialized contiguous CPU tensor of that size and dtype.
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  if (static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype) < kMinCached) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  // With the cache off (capacity 0) blocks still come from here, huge-page
  // advised, and are freed on release.
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, at::MemoryFormat::Contiguous);
}

// The op empty_cached (csrc/ops.cpp): fused linear KD's per-call buffers and
// gradients, resident from one training step to the next.
at::Tensor empty_cached_cpu(const at::Tensor&, at::IntArrayRef size, at::ScalarType dtype) {
  for (const int64_t s : size) DK_CHECK(s >= 0, "size must be non-negative (got ", size, ")");
  return empty_cached(size, dtype);
}

}  // namespace

at::Tensor empty_like_cached(const at::Tensor& t) { return empty_cached(t.sizes(), t.scalar_type()); }

int64_t release_output_cache() { return cache().release(); }

int64_t output_cache_bytes() { return cache().cached_bytes(); }

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("empty_cached", &empty_cached_cpu); }

}  // namespace distillkit::cpu
