// CUDA kernels of the KD-Zero distances (docs/math.md §7). The CPU kernels in
// cpu/distance.cpp are the reference for every output, the correlation stats
// (stats_layout.h) included (the backward reads them).
//
// Pointwise (l1, l2, smooth_l1):
//  - forward: a grid whose size depends on numel alone walks the flat inputs
//    in 16-byte packs; each block reduces its threads' sums in a fixed order
//    to one partial, and a one-block kernel sums the partials in block order.
//    No floating-point atomics, so the sum is bitwise reproducible, on any GPU.
//  - backward: elementwise; the 0-d upstream gradient is read on the device
//    (no host sync).
//
// Correlation (cosine, Pearson) over the middle dim of (outer, D, inner); row
// r = o * inner + i is (o, :, i), so rows and stats are indexed by r directly.
//  - inner == 1: rows are contiguous, one per warp (D <= kWarpRowMaxCols) or
//    per block, walked in packs, with fixed-order all-reductions.
//  - inner > 1 (features over C, or dim=0 "intra" Pearson): a row's elements
//    are inner apart, so a block takes a tile of kTileRows consecutive rows,
//    one per lane (a warp reads kTileRows consecutive addresses per step
//    wherever the tile does not cross an o boundary), times kSlices slices of
//    D, combined through shared memory in slice order.
//  Both run two passes, means then centred products, as the CPU does: the
//  one-pass sum(s^2) - D mean^2 cancels. The backward uses the same mappings
//  without reductions: per-row coefficients from the stats, then one pass
//  that writes both gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "distance.h"
#include "launch.cuh"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {
namespace {

using device::acc_abs;
using device::acc_t;
using device::first_row;
using device::for_each_pack;
using device::group_allreduce;
using device::kWarpSize;
using device::load_pack;
using device::pack_width;
using device::row_stride;
using device::store_pack;
using launch::grid_for;
using launch::kBlockThreads;
using launch::kWarpRowMaxCols;
using launch::pack_aligned;
// Pointwise forward: at most this many blocks, hence partials. Enough to fill
// any current GPU; fixed, so the summation order does not depend on the GPU.
constexpr int kMaxPartials = 1024;
// Strided rows: a block is kTileRows rows (a warp's lanes) x kSlices of D.
constexpr int kTileRows = kWarpSize;
constexpr int kSlices = kBlockThreads / kTileRows;

__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

// N running sums, merged elementwise: the value type of the all-reductions
// of common.cuh, which find merge and shfl_xor by argument-dependent lookup
// (a bare float has no associated namespace, hence the wrapper).
template <typename A, int N>
struct Sums {
  A v[N];
};

template <typename A, int N>
__device__ __forceinline__ Sums<A, N> merge(const Sums<A, N>& x, const Sums<A, N>& y) {
  Sums<A, N> r;
#pragma unroll
  for (int k = 0; k < N; ++k) r.v[k] = x.v[k] + y.v[k];
  return r;
}

template <typename A, int N>
__device__ __forceinline__ Sums<A, N> shfl_xor(const Sums<A, N>& x, int mask) {
  Sums<A, N> r;
#pragma unroll
  for (int k = 0; k < N; ++k) r.v[k] = device::shfl_xor(x.v[k], mask);
  return r;
}

// --- pointwise ------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A pointwise_value(PointwiseOp op, A d) {
  const A ad = acc_abs(d);
  switch (op) {
    case PointwiseOp::L1: return ad;
    case PointwiseOp::L2: return d * d;
    default: return ad < A(1) ? A(0.5) * d * d : ad - A(0.5);
  }
}

// d/dd of the pointwise value; sign(0) = 0 (and sign(NaN) = 0), as the CPU
// kernel and PyTorch's l1/smooth_l1 backward.
template <typename A>
__device__ __forceinline__ A pointwise_grad(PointwiseOp op, A d) {
  if (op == PointwiseOp::L2) return A(2) * d;
  const A sign = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
  if (op == PointwiseOp::L1) return sign;
  return acc_abs(d) < A(1) ? d : sign;
}

// Calls f(j, n) over the flat range [0, numel) of pack-aligned tensors: n =
// kVec elements from j for the packs, then n = 1 for the tail (n is a
// std::integral_constant); all of it one element at a time when `aligned` is
// false. Thread t of the grid takes every (grid size)-th unit from t, so a
// warp's loads are consecutive.
template <int kVec, typename F>
__device__ __forceinline__ void for_each_flat(int64_t numel, bool aligned, F&& f) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t packs = aligned ? numel / kVec : 0;
  for (int64_t p = first; p < packs; p += stride) {
    f(p * kVec, std::integral_constant<int, kVec>{});
  }
  for (int64_t j = packs * kVec + first; j < numel; j += stride) {
    f(j, std::integral_constant<int, 1>{});
  }
}

template <typename S, typename U, typename A>
struct PointwiseForwardArgs {
  const S* student;
  const U* teacher;
  A* partials;  // (gridDim.x,)
  int64_t numel;
  PointwiseOp op;
  bool aligned;  // both base pointers are aligned to a pack
};

template <typename S, typename U, typename A>
struct PointwiseBackwardArgs {
  const A* grad;  // the 0-d upstream gradient
  const S* student;
  const U* teacher;
  S* grad_student;
  U* grad_teacher;  // nullptr unless the teacher gradient is wanted
  int64_t numel;
  PointwiseOp op;
  bool aligned;  // every base pointer is aligned to a pack
};

template <typename S, typename U, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_distance_forward_kernel(const PointwiseForwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  __shared__ Sums<A, 1> smem[kBlockThreads / kWarpSize];
  Sums<A, 1> acc{{A(0)}};
  for_each_flat<kVec>(args.numel, args.aligned, [&](int64_t j, auto n) {
    constexpr int N = decltype(n)::value;
    A s[N], t[N];
    load_pack<N>(args.student + j, s);
    load_pack<N>(args.teacher + j, t);
#pragma unroll
    for (int k = 0; k < N; ++k) acc.v[0] += pointwise_value(args.op, s[k] - t[k]);
  });
  acc = group_allreduce<kBlockThreads>(acc, smem);
  if (threadIdx.x == 0) args.partials[blockIdx.x] = acc.v[0];
}

// One block: thread k sums partials k, k + kBlockThreads, ... in order, then
// a fixed-order block reduction. n = 0 writes 0 (an empty input's sum).
template <typename A>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_distance_sum_partials_kernel(const A* partials, int n, A* out) {
  __shared__ Sums<A, 1> smem[kBlockThreads / kWarpSize];
  Sums<A, 1> acc{{A(0)}};
  for (int k = threadIdx.x; k < n; k += kBlockThreads) acc.v[0] += partials[k];
  acc = group_allreduce<kBlockThreads>(acc, smem);
  if (threadIdx.x == 0) *out = acc.v[0];
}

template <typename S, typename U, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_distance_backward_kernel(const PointwiseBackwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  const A g = *args.grad;
  for_each_flat<kVec>(args.numel, args.aligned, [&](int64_t j, auto n) {
    constexpr int N = decltype(n)::value;
    A s[N], t[N], gs[N], gt[N];
    load_pack<N>(args.student + j, s);
    load_pack<N>(args.teacher + j, t);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      gs[k] = g * pointwise_grad(args.op, s[k] - t[k]);
      gt[k] = A(0) - gs[k];
    }
    store_pack<N>(args.grad_student + j, gs);
    if (args.grad_teacher != nullptr) store_pack<N>(args.grad_teacher + j, gt);
  });
}

// --- correlation ----------------------------------------------------------------

template <typename S, typename U, typename A>
struct CorrForwardArgs {
  const S* student;
  const U* teacher;
  A* rows;   // (outer * inner,)
  A* stats;  // (outer * inner, correlation_distance_stats::kCols)
  int64_t outer;
  int64_t D;
  int64_t inner;
  bool center;
  bool aligned;  // both base pointers are aligned to a pack (inner == 1 only)
};

template <typename S, typename U, typename A>
struct CorrBackwardArgs {
  const A* grad_rows;  // (outer * inner,)
  const A* stats;      // (outer * inner, correlation_distance_stats::kCols), from the forward
  const S* student;
  const U* teacher;
  S* grad_student;
  U* grad_teacher;  // nullptr unless the teacher gradient is wanted
  int64_t outer;
  int64_t D;
  int64_t inner;
  bool aligned;  // every base pointer is aligned to a pack (inner == 1 only)
};

// Stores row r's stats (mean s, mean t, |u|, |v|, <u, v>) and its distance
// 1 - <u, v> / (|u| |v| + eps), or 1 for a degenerate row (|u| = 0 or |v| = 0).
template <typename S, typename U, typename A>
__device__ __forceinline__ void store_row(const CorrForwardArgs<S, U, A>& args, int64_t r,
                                          A ms, A mt, A uu, A vv, A uv) {
  const A nu = acc_sqrt(uu);
  const A nv = acc_sqrt(vv);
  A* st = args.stats + r * correlation_distance_stats::kCols;
  st[correlation_distance_stats::kMeanStudent] = ms;
  st[correlation_distance_stats::kMeanTeacher] = mt;
  st[correlation_distance_stats::kNormStudent] = nu;
  st[correlation_distance_stats::kNormTeacher] = nv;
  st[correlation_distance_stats::kDot] = uv;
  args.rows[r] = (nu == A(0) || nv == A(0))
                     ? A(1)
                     : A(1) - uv / (nu * nv + static_cast<A>(kCorrelationEps));
}

// Row r's backward, read from the stats: ds = as v + bs u, dt = as u + bt v
// for u = s - ms, v = t - mt (the means are 0 without centring, so one path
// serves cosine and Pearson). With den = |u| |v| + eps and g the row's
// upstream gradient: as = -g / den, bs = g <u,v> |v| / (|u| den^2),
// bt = g <u,v> |u| / (|v| den^2); all 0 for a degenerate row.
template <typename A>
struct CorrGrad {
  A ms, mt, as, bs, bt;
};

template <typename A>
__device__ __forceinline__ CorrGrad<A> corr_grad(const A* stats, const A* grad_rows, int64_t r) {
  const A* st = stats + r * correlation_distance_stats::kCols;
  const A nu = st[correlation_distance_stats::kNormStudent];
  const A nv = st[correlation_distance_stats::kNormTeacher];
  const A dot = st[correlation_distance_stats::kDot];
  CorrGrad<A> c{st[correlation_distance_stats::kMeanStudent],
                st[correlation_distance_stats::kMeanTeacher], A(0), A(0), A(0)};
  if (nu == A(0) || nv == A(0)) return c;
  const A g = grad_rows[r];
  const A den = nu * nv + static_cast<A>(kCorrelationEps);
  c.as = g * (-A(1) / den);
  c.bs = g * (dot * nv / (nu * den * den));
  c.bt = g * (dot * nu / (nv * den * den));
  return c;
}

// inner == 1: row r is elements [r * D, (r + 1) * D).
template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    correlation_distance_rows_forward_kernel(const CorrForwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  __shared__ Sums<A, 2> mean_smem[kBlockThreads / kWarpSize];
  __shared__ Sums<A, 3> prod_smem[kBlockThreads / kWarpSize];
  const int lane = threadIdx.x % kRowThreads;
  const int cols = static_cast<int>(args.D);

  for (int64_t r = first_row<kBlockThreads, kRowThreads>(); r < args.outer;
       r += row_stride<kBlockThreads, kRowThreads>()) {
    const int64_t start = r * args.D;
    const S* s = args.student + start;
    const U* t = args.teacher + start;
    A ms = A(0), mt = A(0);
    if (args.center) {
      Sums<A, 2> m{{A(0), A(0)}};
      for_each_pack<kVec>(start, cols, args.aligned, lane, kRowThreads, [&](int j, auto n) {
        constexpr int N = decltype(n)::value;
        A sv[N], tv[N];
        load_pack<N>(s + j, sv);
        load_pack<N>(t + j, tv);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          m.v[0] += sv[k];
          m.v[1] += tv[k];
        }
      });
      m = group_allreduce<kRowThreads>(m, mean_smem);
      ms = m.v[0] / static_cast<A>(args.D);
      mt = m.v[1] / static_cast<A>(args.D);
    }
    Sums<A, 3> p{{A(0), A(0), A(0)}};
    for_each_pack<kVec>(start, cols, args.aligned, lane, kRowThreads, [&](int j, auto n) {
      constexpr int N = decltype(n)::value;
      A sv[N], tv[N];
      load_pack<N>(s + j, sv);
      load_pack<N>(t + j, tv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A u = sv[k] - ms, v = tv[k] - mt;
        p.v[0] += u * u;
        p.v[1] += v * v;
        p.v[2] += u * v;
      }
    });
    p = group_allreduce<kRowThreads>(p, prod_smem);
    if (lane == 0) store_row(args, r, ms, mt, p.v[0], p.v[1], p.v[2]);
  }
}

template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    correlation_distance_rows_backward_kernel(const CorrBackwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  const int lane = threadIdx.x % kRowThreads;
  const int cols = static_cast<int>(args.D);

  for (int64_t r = first_row<kBlockThreads, kRowThreads>(); r < args.outer;
       r += row_stride<kBlockThreads, kRowThreads>()) {
    const int64_t start = r * args.D;
    const S* s = args.student + start;
    const U* t = args.teacher + start;
    S* gs = args.grad_student + start;
    U* gt = args.grad_teacher == nullptr ? nullptr : args.grad_teacher + start;
    const CorrGrad<A> c = corr_grad(args.stats, args.grad_rows, r);
    for_each_pack<kVec>(start, cols, args.aligned, lane, kRowThreads, [&](int j, auto n) {
      constexpr int N = decltype(n)::value;
      A sv[N], tv[N], ds[N], dt[N];
      load_pack<N>(s + j, sv);
      load_pack<N>(t + j, tv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A u = sv[k] - c.ms, v = tv[k] - c.mt;
        ds[k] = c.as * v + c.bs * u;
        dt[k] = c.as * u + c.bt * v;
      }
      store_pack<N>(gs + j, ds);
      if (gt != nullptr) store_pack<N>(gt + j, dt);
    });
  }
}

// Sum over the kSlices threads that share a row (threadIdx.x = slice *
// kTileRows + lane), added in slice order so that all of them get the same
// value. Every thread of the block must call it; `smem` may be reused by the
// next call: the leading barrier waits for its readers.
template <typename A, int N>
__device__ __forceinline__ Sums<A, N> slice_allreduce(Sums<A, N> v,
                                                      Sums<A, N> (&smem)[kSlices][kTileRows]) {
  const int lane = threadIdx.x % kTileRows;
  const int slice = threadIdx.x / kTileRows;
  __syncthreads();
  smem[slice][lane] = v;
  __syncthreads();
  v = smem[0][lane];
#pragma unroll
  for (int k = 1; k < kSlices; ++k) v = merge(v, smem[k][lane]);
  return v;
}

// inner > 1: row r = o * inner + i is elements o * D * inner + i + j * inner,
// j < D; the thread (slice, lane) of a tile takes row tile * kTileRows + lane
// and j = slice, slice + kSlices, ...
template <typename S, typename U, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    correlation_distance_strided_forward_kernel(const CorrForwardArgs<S, U, A> args) {
  __shared__ Sums<A, 2> mean_smem[kSlices][kTileRows];
  __shared__ Sums<A, 3> prod_smem[kSlices][kTileRows];
  const int lane = threadIdx.x % kTileRows;
  const int slice = threadIdx.x / kTileRows;
  const int64_t rows = args.outer * args.inner;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t step = kSlices * args.inner;

  // Uniform over the block, so the barriers of slice_allreduce are safe;
  // threads past the last row take part in them with zero sums.
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r = tile * kTileRows + lane;
    const bool live = r < rows;
    const int64_t o = r / args.inner, i = r % args.inner;
    const int64_t first = (o * args.D + slice) * args.inner + i;
    const int64_t end = (o + 1) * args.D * args.inner;
    A ms = A(0), mt = A(0);
    if (args.center) {
      Sums<A, 2> m{{A(0), A(0)}};
      if (live) {
        for (int64_t e = first; e < end; e += step) {
          m.v[0] += static_cast<A>(args.student[e]);
          m.v[1] += static_cast<A>(args.teacher[e]);
        }
      }
      m = slice_allreduce(m, mean_smem);
      ms = m.v[0] / static_cast<A>(args.D);
      mt = m.v[1] / static_cast<A>(args.D);
    }
    Sums<A, 3> p{{A(0), A(0), A(0)}};
    if (live) {
      for (int64_t e = first; e < end; e += step) {
        const A u = static_cast<A>(args.student[e]) - ms;
        const A v = static_cast<A>(args.teacher[e]) - mt;
        p.v[0] += u * u;
        p.v[1] += v * v;
        p.v[2] += u * v;
      }
    }
    p = slice_allreduce(p, prod_smem);
    if (live && slice == 0) store_row(args, r, ms, mt, p.v[0], p.v[1], p.v[2]);
  }
}

template <typename S, typename U, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    correlation_distance_strided_backward_kernel(const CorrBackwardArgs<S, U, A> args) {
  const int lane = threadIdx.x % kTileRows;
  const int slice = threadIdx.x / kTileRows;
  const int64_t rows = args.outer * args.inner;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t step = kSlices * args.inner;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r = tile * kTileRows + lane;
    if (r >= rows) continue;
    const int64_t o = r / args.inner, i = r % args.inner;
    const int64_t first = (o * args.D + slice) * args.inner + i;
    const int64_t end = (o + 1) * args.D * args.inner;
    const CorrGrad<A> c = corr_grad(args.stats, args.grad_rows, r);
    for (int64_t e = first; e < end; e += step) {
      const A u = static_cast<A>(args.student[e]) - c.ms;
      const A v = static_cast<A>(args.teacher[e]) - c.mt;
      args.grad_student[e] = static_cast<S>(c.as * v + c.bs * u);
      if (args.grad_teacher != nullptr) args.grad_teacher[e] = static_cast<U>(c.as * u + c.bt * v);
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename S, typename U>
void launch_pointwise_forward(const at::Tensor& s, const at::Tensor& t, PointwiseOp op,
                              at::Tensor& out) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  PointwiseForwardArgs<S, U, A> args;
  args.student = s.data_ptr<S>();
  args.teacher = t.data_ptr<U>();
  args.numel = s.numel();
  args.op = op;
  args.aligned = pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher);
  const int64_t units = args.aligned ? (args.numel + kVec - 1) / kVec : args.numel;
  const int blocks = static_cast<int>(
      std::min<int64_t>(kMaxPartials, (units + kBlockThreads - 1) / kBlockThreads));
  at::Tensor partials = at::empty({blocks}, out.options());
  args.partials = partials.data_ptr<A>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    pointwise_distance_forward_kernel<S, U, A><<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  pointwise_distance_sum_partials_kernel<A>
      <<<1, kBlockThreads, 0, stream>>>(args.partials, blocks, out.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename U>
void launch_pointwise_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& t,
                               PointwiseOp op, at::Tensor& gs, at::Tensor& gt,
                               bool teacher_grad) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  PointwiseBackwardArgs<S, U, A> args;
  args.grad = grad.data_ptr<A>();
  args.student = s.data_ptr<S>();
  args.teacher = t.data_ptr<U>();
  args.grad_student = gs.data_ptr<S>();
  args.grad_teacher = teacher_grad ? gt.data_ptr<U>() : nullptr;
  args.numel = s.numel();
  args.op = op;
  args.aligned = pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher) &&
                 pack_aligned<kVec>(args.grad_student) &&
                 (!teacher_grad || pack_aligned<kVec>(args.grad_teacher));
  const int64_t units = args.aligned ? (args.numel + kVec - 1) / kVec : args.numel;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  pointwise_distance_backward_kernel<S, U, A>
      <<<grid_for(units, kBlockThreads), kBlockThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Only a contiguous row (inner <= 1) is walked with int column indices.
void check_row_fits(int64_t D, int64_t inner) {
  if (inner <= 1) launch::check_cols_fit(D, "student", "elements per row");
}

// inner > 1: a tile of kTileRows strided rows per block; otherwise one
// contiguous row per warp or per block.
template <typename Args>
void launch_correlation(const Args& args, void (*strided)(Args), void (*per_warp)(Args),
                        void (*per_block)(Args)) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (args.inner > 1) {
    strided<<<grid_for(args.outer * args.inner, kTileRows), kBlockThreads, 0, stream>>>(args);
  } else {
    launch::launch_row_groups(args.D <= kWarpRowMaxCols, args.outer, per_warp, per_block, args,
                              stream);
  }
}

template <typename S, typename U>
void launch_correlation_forward(const at::Tensor& s, const at::Tensor& t, bool center,
                                at::Tensor& rows, at::Tensor& stats) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  CorrForwardArgs<S, U, A> args;
  args.student = s.data_ptr<S>();
  args.teacher = t.data_ptr<U>();
  args.rows = rows.data_ptr<A>();
  args.stats = stats.data_ptr<A>();
  args.outer = s.size(0);
  args.D = s.size(1);
  args.inner = s.size(2);
  args.center = center;
  args.aligned = pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher);
  launch_correlation(args, correlation_distance_strided_forward_kernel<S, U, A>,
                     correlation_distance_rows_forward_kernel<S, U, A, kWarpSize>,
                     correlation_distance_rows_forward_kernel<S, U, A, kBlockThreads>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename U>
void launch_correlation_backward(const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                                 const at::Tensor& stats, at::Tensor& gs, at::Tensor& gt,
                                 bool teacher_grad) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  CorrBackwardArgs<S, U, A> args;
  args.grad_rows = g.data_ptr<A>();
  args.stats = stats.data_ptr<A>();
  args.student = s.data_ptr<S>();
  args.teacher = t.data_ptr<U>();
  args.grad_student = gs.data_ptr<S>();
  args.grad_teacher = teacher_grad ? gt.data_ptr<U>() : nullptr;
  args.outer = s.size(0);
  args.D = s.size(1);
  args.inner = s.size(2);
  args.aligned = pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher) &&
                 pack_aligned<kVec>(args.grad_student) &&
                 (!teacher_grad || pack_aligned<kVec>(args.grad_teacher));
  launch_correlation(args, correlation_distance_strided_backward_kernel<S, U, A>,
                     correlation_distance_rows_backward_kernel<S, U, A, kWarpSize>,
                     correlation_distance_rows_backward_kernel<S, U, A, kBlockThreads>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pointwise_distance_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                           c10::string_view op_name) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  device_error_record(student);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  at::Tensor out = at::empty({}, s.options().dtype(acc_scalar_type(s)));
  dispatch_input_types(s, "student", t, "teacher", [&]<typename S, typename U>() {
    launch_pointwise_forward<S, U>(s, t, op, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pointwise_distance_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    c10::string_view op_name, bool teacher_grad) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  // The kernels read grad on the device: no .item() host sync.
  const auto acc = acc_scalar_type(student);
  DK_CHECK(grad.numel() == 1 && grad.scalar_type() == acc, "grad must be a one-element ", acc,
           " tensor (got ", grad.sizes(), " ", grad.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(grad, "grad", student, "student");
  device_error_record(student);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, t.options());
  if (s.numel() == 0) return {gs, gt};
  dispatch_input_types(s, "student", t, "teacher", [&]<typename S, typename U>() {
    launch_pointwise_backward<S, U>(grad, s, t, op, gs, gt, teacher_grad);
  });
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, bool center) {
  check_distance_inputs(student, teacher, 3);
  check_row_fits(student.size(1), student.size(2));
  device_error_record(student);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t outer = s.size(0), inner = s.size(2);
  const auto opts = s.options().dtype(acc_scalar_type(s));
  at::Tensor rows = at::empty({outer, inner}, opts);
  at::Tensor stats = at::empty({outer, inner, correlation_distance_stats::kCols}, opts);
  if (rows.numel() == 0) return {rows, stats};
  dispatch_input_types(s, "student", t, "teacher", [&]<typename S, typename U>() {
    launch_correlation_forward<S, U>(s, t, center, rows, stats);
  });
  return {rows, stats};
}

// `center` is not read: the stats carry the means, 0 without centring.
std::tuple<at::Tensor, at::Tensor> correlation_distance_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& stats, bool /*center*/, bool teacher_grad) {
  check_distance_inputs(student, teacher, 3);
  check_correlation_distance_backward_args(grad_rows, stats, student);
  check_row_fits(student.size(1), student.size(2));
  device_error_record(student);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const at::Tensor g = grad_rows.contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, t.options());
  if (s.numel() == 0) return {gs, gt};
  dispatch_input_types(s, "student", t, "teacher", [&]<typename S, typename U>() {
    launch_correlation_backward<S, U>(g, s, t, st, gs, gt, teacher_grad);
  });
  return {gs, gt};
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("pointwise_distance_forward", &distillkit::pointwise_distance_forward_cuda);
  m.impl("pointwise_distance_backward", &distillkit::pointwise_distance_backward_cuda);
  m.impl("correlation_distance_forward", &distillkit::correlation_distance_forward_cuda);
  m.impl("correlation_distance_backward", &distillkit::correlation_distance_backward_cuda);
}
