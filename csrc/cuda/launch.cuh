// Host-side helpers shared by the CUDA ops: pack alignment, grid sizes, the launch of a row-group kernel
// and the check that a row's columns fit the kernels' int indices.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "common.cuh"
#include "dispatch.h"

namespace distillkit {
namespace launch {

template <int kVec, typename T>
bool pack_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// Blocks for `units` units of work, `per_block` per block; units beyond the
// grid are taken by the kernels' grid-stride loops.
inline dim3 grid_for(int64_t units, int64_t per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  return dim3(static_cast<unsigned>(
      std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max())));
}

// Launches a kernel that takes one row per group of threads (see
// device::first_row): per_warp, a row per warp, when warp_rows, else
// per_block, a row per block. The caller checks the launch.
template <int kBlockThreads, typename Args>
void launch_row_groups(bool warp_rows, int64_t rows, void (*per_warp)(Args),
                       void (*per_block)(Args), const Args& args, cudaStream_t stream) {
  if (warp_rows) {
    per_warp<<<grid_for(rows, kBlockThreads / device::kWarpSize), kBlockThreads, 0, stream>>>(
        args);
  } else {
    per_block<<<grid_for(rows, 1), kBlockThreads, 0, stream>>>(args);
  }
}

// A row is walked with int column indices (for_each_pack). `name` and `what`
// say whose row and of what, for the error message.
inline void check_cols_fit(int64_t cols, const char* name, const char* what) {
  DK_CHECK(cols <= std::numeric_limits<int>::max(), name, " must have at most ",
           std::numeric_limits<int>::max(), " ", what, " on CUDA (got ", cols, ")");
}

}  // namespace launch
}  // namespace distillkit
