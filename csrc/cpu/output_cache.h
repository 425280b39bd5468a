// A bounded cache of the large CPU buffers our kernels return (gradients,
// LSTM states). A fresh multi-MB tensor is a fresh mmap, and the kernel that
// fills it pays a page fault and the OS's zeroing per page: on the 2-core
// machine a (4096, 32000) fp32 gradient took ~95 ms to write fresh against
// ~52 ms into resident memory. A training loop asks for the same sizes every
// step, so keeping freed blocks resident (as PyTorch's CUDA allocator does)
// removes that cost from every step after the first.
//  - Only blocks of at least 1 MiB are cached; smaller ones come from the
//    default CPU allocator, whose heap already reuses them.
//  - At most DISTILLKIT_CPU_CACHE_MB (read once; default 2048, 0 disables)
//    are kept; the oldest freed blocks are released first.
//  - A block is reused only for a request of the same size (rounded up to
//    2 MiB), the common case of a loop; other sizes allocate afresh.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace distillkit::cpu {

// An uninitialized contiguous tensor like t, for an output that the kernel
// then writes in full.
at::Tensor empty_like_cached(const at::Tensor& t);

// Frees every cached block; returns the bytes released.
int64_t release_output_cache();

// Bytes held by cached (free) blocks.
int64_t output_cache_bytes();

}  // namespace distillkit::cpu
