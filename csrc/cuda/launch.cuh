// Host-side helpers shared by the CUDA ops: the launch constants, pack
// alignment, grid sizes, the launch of a row-group kernel and the check that a
// row's columns fit the kernels' int indices. The dtype dispatch is
// dispatch.h's, shared with the CPU host code.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "common.cuh"
#include "dispatch.h"

namespace distillkit {
namespace launch {

// Threads per block of the row kernels (kd_loss, sparse_kd_loss, slam_loss,
// the distances); their __launch_bounds__ and row loops are compiled for it.
constexpr int kBlockThreads = 256;
// Contiguous rows up to this length go one per warp (at most 32 values per
// lane for 2-byte inputs): a block per row would leave most of its threads
// idle and pay block barriers for a few packs.
constexpr int kWarpRowMaxCols = 1024;

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

// Launches a kernel of kBlockThreads threads that takes one row per group of
// threads (see device::first_row): per_warp, a row per warp, when warp_rows,
// else per_block, a row per block. The caller checks the launch.
template <typename Args>
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
