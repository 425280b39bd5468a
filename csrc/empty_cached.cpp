// empty_cached on every backend but the CPU (csrc/ops.cpp): at::empty, since
// their allocators already cache (CUDA's), or allocate nothing (Meta).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"

namespace distillkit {
namespace {

at::Tensor empty_cached_composite(const at::Tensor& like, at::IntArrayRef size,
                                  at::ScalarType dtype) {
  for (const int64_t s : size) DK_CHECK(s >= 0, "size must be non-negative (got ", size, ")");
  return at::empty(size, like.options().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CompositeExplicitAutograd, m) {
  m.impl("empty_cached", &empty_cached_composite);
}

}  // namespace distillkit
