#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

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

}  // namespace

at::Tensor empty_like_cached(const at::Tensor& t) {
  if (static_cast<size_t>(t.nbytes()) < kMinCached) {
    return at::empty_like(t, t.options(), at::MemoryFormat::Contiguous);
  }
  // With the cache off (capacity 0) blocks still come from here, huge-page
  // advised, and are freed on release.
  return at::detail::empty_generic(t.sizes(), &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   t.scalar_type(), at::MemoryFormat::Contiguous);
}

int64_t release_output_cache() { return cache().release(); }

int64_t output_cache_bytes() { return cache().cached_bytes(); }

}  // namespace distillkit::cpu
