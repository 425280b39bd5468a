// CUDA kernels of the KD-Zero distances (docs/math.md §7). The CPU kernels in
// cpu/distance.cpp are the reference for every output, the correlation stats
// (stats_layout.h) included (the backward reads them).
//
// Pointwise (l1, l2, smooth_l1):
//  - forward: a grid whose size depends on numel alone walks the inputs in
//    units of a 16-byte pack of the element order; each block reduces its
//    threads' sums in a fixed order to one partial, and a one-block kernel
//    sums the partials in block order. No floating-point atomics, so the sum
//    is bitwise reproducible, on any GPU, and the same for every layout.
//  - row-strided inputs (PointwiseRows) are read in place: a unit within one
//    row whose pack is aligned is one vector load, any other (across rows, or
//    misaligned) is read one element at a time in the same order. Contiguous
//    inputs take a kernel without the row bookkeeping (its registers).
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
//  Both run two passes, means then centred products (and the centred values'
//  own sums, which correct the means: the corrected two-pass algorithm), as
//  stable as the CPU's: the one-pass sum(s^2) - D mean^2 cancels. A row whose
//  sums over- or underflow (entries near 1e±19 in fp32) or sit at the
//  rounding level of its mean (a constant row) takes a careful path, the
//  CPU's careful_stats: extremes (degenerate rows exactly), then the centred
//  values scaled by powers of two. The stats hold norms and the cosine, never
//  <u, v> or |u| |v| (which overflow), and the backward works on u / |u| and
//  v / |v|. The backward uses the same mappings without reductions: per-row
//  coefficients from the stats, then one pass that writes both gradients.
//  With inner == 1 the rows are read in place at any row stride.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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
__device__ __forceinline__ float acc_frexp(float x, int* e) { return frexpf(x, e); }
__device__ __forceinline__ double acc_frexp(double x, int* e) { return frexp(x, e); }
__device__ __forceinline__ float acc_ldexp(float x, int e) { return ldexpf(x, e); }
__device__ __forceinline__ double acc_ldexp(double x, int e) { return ldexp(x, e); }

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

// The PointwiseRows layout of both inputs (distance.h): element j is column
// j % len of row j / len, at row * s_row + col of the student's data and
// row * t_row + col of the teacher's.
struct PointwiseLayout {
  int64_t numel;
  int64_t len;
  int64_t s_row;
  int64_t t_row;
};

// A thread's position in the rows: element j = row * len + col.
struct RowPos {
  int64_t row;
  int64_t col;
};

__device__ __forceinline__ RowPos row_pos(int64_t j, int64_t len) {
  if (j < len) return {0, j};  // always so for one row (contiguous inputs): no division
  const int64_t row = j / len;
  return {row, j - row * len};
}

// Reads the n <= kVec elements of an input from position p on into v[0, n)
// (the rest set to 0): one pack where they lie in one row and the pack is
// aligned, else one element at a time along the rows. The values land in the
// same places either way, so every sum is that of a contiguous input. kRows
// false: contiguous inputs, one row (p.row = 0), which no unit leaves.
template <int kVec, bool kRows, typename T, typename A>
__device__ __forceinline__ void load_unit(const T* base, int64_t row_stride, int64_t len,
                                          RowPos p, int n, A (&v)[kVec]) {
  const T* first = base + p.row * row_stride + p.col;
  const bool one_row = !kRows || p.col + n <= len;
  if (n == kVec && one_row &&
      reinterpret_cast<std::uintptr_t>(first) % (sizeof(T) * kVec) == 0) {
    load_pack<kVec>(first, v);
    return;
  }
  if (one_row) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = k < n ? static_cast<A>(first[k]) : A(0);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    v[k] = A(0);
    if (k < n) {
      v[k] = static_cast<A>(base[p.row * row_stride + p.col]);
      if (++p.col == len) {
        p.col = 0;
        ++p.row;
      }
    }
  }
}

// Writes v[0, n) to elements [j, j + n) of a contiguous gradient: one pack
// where whole and aligned, else one element at a time.
template <int kVec, typename T, typename A>
__device__ __forceinline__ void store_unit(T* p, int n, const A (&v)[kVec]) {
  if (n == kVec && reinterpret_cast<std::uintptr_t>(p) % (sizeof(T) * kVec) == 0) {
    store_pack<kVec>(p, v);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < n) p[k] = static_cast<T>(v[k]);
  }
}

// Calls f(j, n, s, t) for the units of kVec elements of the element order
// [0, numel) (the last one n = numel - j < kVec elements), s and t the
// inputs' elements read by load_unit. Thread t of the grid takes every (grid
// size)-th unit from t, so a warp's loads are consecutive within a row; the
// units, hence each thread's sums, depend on numel alone, not on the layout
// or the alignment. A thread's row position advances without a division.
// kRows false (PointwiseRows::flat()): contiguous inputs, element j at j,
// without the row bookkeeping (fewer registers: full occupancy).
template <int kVec, bool kRows, typename S, typename U, typename A, typename F>
__device__ __forceinline__ void for_each_unit(const S* student, const U* teacher,
                                              const PointwiseLayout& l, F&& f) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t units = (l.numel + kVec - 1) / kVec;
  if (first >= units) return;
  RowPos p{0, first * kVec}, step{0, stride * kVec};
  if constexpr (kRows) {
    p = row_pos(p.col, l.len);
    // The backward's grid covers every unit: no step to divide.
    if (first + stride < units) step = row_pos(step.col, l.len);
  }
  for (int64_t u = first; u < units; u += stride) {
    const int64_t j = u * kVec;
    const int n = l.numel - j < kVec ? static_cast<int>(l.numel - j) : kVec;
    A s[kVec], t[kVec];
    load_unit<kVec, kRows>(student, l.s_row, l.len, p, n, s);
    load_unit<kVec, kRows>(teacher, l.t_row, l.len, p, n, t);
    f(j, n, s, t);
    p.col += step.col;
    if constexpr (kRows) {
      p.row += step.row;
      if (p.col >= l.len) {
        p.col -= l.len;
        ++p.row;
      }
    }
  }
}

template <typename S, typename U, typename A>
struct PointwiseForwardArgs {
  const S* student;
  const U* teacher;
  A* partials;  // (gridDim.x,)
  PointwiseLayout layout;
  PointwiseOp op;
};

template <typename S, typename U, typename A>
struct PointwiseBackwardArgs {
  const A* grad;  // the 0-d upstream gradient
  const S* student;
  const U* teacher;
  S* grad_student;  // contiguous
  U* grad_teacher;  // contiguous; nullptr unless the teacher gradient is wanted
  PointwiseLayout layout;
  PointwiseOp op;
};

template <typename S, typename U, typename A, bool kRows>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_distance_forward_kernel(const PointwiseForwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  __shared__ Sums<A, 1> smem[kBlockThreads / kWarpSize];
  Sums<A, 1> acc{{A(0)}};
  for_each_unit<kVec, kRows, S, U, A>(args.student, args.teacher, args.layout,
                               [&](int64_t, int n, const A (&s)[kVec], const A (&t)[kVec]) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < n) acc.v[0] += pointwise_value(args.op, s[k] - t[k]);
    }
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

template <typename S, typename U, typename A, bool kRows>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_distance_backward_kernel(const PointwiseBackwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  const A g = *args.grad;
  for_each_unit<kVec, kRows, S, U, A>(args.student, args.teacher, args.layout,
                               [&](int64_t j, int n, const A (&s)[kVec], const A (&t)[kVec]) {
    A gs[kVec], gt[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      gs[k] = g * pointwise_grad(args.op, s[k] - t[k]);
      gt[k] = A(0) - gs[k];
    }
    store_unit<kVec>(args.grad_student + j, n, gs);
    if (args.grad_teacher != nullptr) store_unit<kVec>(args.grad_teacher + j, n, gt);
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
  int64_t s_row;  // inner == 1: the student's row stride (rows read in place)
  int64_t t_row;  // inner == 1: the teacher's row stride
  bool center;
  bool aligned;  // every row starts at the same phase of a pack (inner == 1 only)
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
  int64_t s_row;  // inner == 1: the student's row stride (rows read in place)
  int64_t t_row;  // inner == 1: the teacher's row stride
  bool aligned;  // every row starts at the same phase of a pack (inner == 1 only)
};

// The math of the row stats is the CPU kernel's (cpu/distance.cpp: CorrSums,
// sums_hold, careful_stats, eps_weight, CorrGrad), step for step.

// A row's stats as stored: means (0 for cosine), |u|, |v| and cos(u, v) (in
// [-1, 1] whatever the magnitudes; zero norms and cosine for a degenerate row).
template <typename A>
struct Corr {
  A ms, mt, nu, nv, cos;
};

// Whether the fast sums (means, sum u^2, sum v^2, sum u v) hold the stats to
// their digits: finite, and sum u^2, sum v^2 above D min / eps (no square lost
// digits to underflow) and D (16 eps mean)^2 (the row is not constant, or
// nearly, at the rounding level of its mean). Otherwise the careful path.
template <typename A>
__device__ __forceinline__ bool sums_hold(A ms, A mt, A uu, A vv, A uv, int64_t D) {
  using L = std::numeric_limits<A>;
  const A n = static_cast<A>(D);
  const A mu = A(16) * L::epsilon() * ms, mv = A(16) * L::epsilon() * mt;
  const A tiny = L::min() / L::epsilon();
  return device::acc_isfinite(uu) && device::acc_isfinite(vv) && device::acc_isfinite(uv) &&
         uu >= n * device::acc_max(tiny, mu * mu) && vv >= n * device::acc_max(tiny, mv * mv);
}

template <typename A>
__device__ __forceinline__ Corr<A> corr_from_sums(A ms, A mt, A uu, A vv, A uv) {
  const A nu = acc_sqrt(uu), nv = acc_sqrt(vv);
  return {ms, mt, nu, nv, uv / nu / nv};
}

// The fast path's second pass: u, v, u^2, v^2, u v of the centred values.
template <typename A>
__device__ __forceinline__ void add_centred(Sums<A, 5>& p, A u, A v) {
  p.v[0] += u;
  p.v[1] += v;
  p.v[2] += u * u;
  p.v[3] += v * v;
  p.v[4] += u * v;
}

// Pearson: the products corrected by the centred values' own means (the
// rounding of the first pass's means, which would add D (mean error)^2 to
// sum u^2), and the means with them: the corrected two-pass algorithm.
template <typename A>
__device__ __forceinline__ void correct_mean(Sums<A, 5>& p, int64_t D, A& ms, A& mt) {
  const A n = static_cast<A>(D), cu = p.v[0] / n, cv = p.v[1] / n;
  p.v[2] = device::acc_max(A(0), p.v[2] - cu * p.v[0]);
  p.v[3] = device::acc_max(A(0), p.v[3] - cv * p.v[1]);
  p.v[4] -= cu * p.v[1];
  ms += cu;
  mt += cv;
}

// The careful path's first pass: extremes of s and t (a row is degenerate
// exactly when constant, for Pearson, or zero, for cosine) and a probe that is
// NaN when an entry is NaN or infinite (fmin/fmax would skip a NaN).
template <typename A>
struct Extremes {
  A s_lo, s_hi, t_lo, t_hi, probe;
};

template <typename A>
__device__ __forceinline__ Extremes<A> extremes_empty() {
  const A inf = std::numeric_limits<A>::infinity();
  return {inf, -inf, inf, -inf, A(0)};
}

template <typename A>
__device__ __forceinline__ void extremes_add(Extremes<A>& x, A s, A t) {
  x.s_lo = device::acc_min(x.s_lo, s);
  x.s_hi = device::acc_max(x.s_hi, s);
  x.t_lo = device::acc_min(x.t_lo, t);
  x.t_hi = device::acc_max(x.t_hi, t);
  x.probe += (s - s) + (t - t);
}

template <typename A>
__device__ __forceinline__ Extremes<A> merge(const Extremes<A>& x, const Extremes<A>& y) {
  return {device::acc_min(x.s_lo, y.s_lo), device::acc_max(x.s_hi, y.s_hi),
          device::acc_min(x.t_lo, y.t_lo), device::acc_max(x.t_hi, y.t_hi), x.probe + y.probe};
}

template <typename A>
__device__ __forceinline__ Extremes<A> shfl_xor(const Extremes<A>& x, int mask) {
  return {device::shfl_xor(x.s_lo, mask), device::shfl_xor(x.s_hi, mask),
          device::shfl_xor(x.t_lo, mask), device::shfl_xor(x.t_hi, mask),
          device::shfl_xor(x.probe, mask)};
}

// The careful path's scaling: the centred values are scaled by 2^-es and
// 2^-et (exact), which bring the largest to [1/2, 1), and summed in pass 2.
template <typename A>
struct Careful {
  A ms, mt;   // the means the values are centred on (0 for cosine)
  int es, et;
  bool degenerate;
  bool nan;

  __device__ __forceinline__ Careful(const Extremes<A>& x, A ms_, A mt_, bool center)
      : ms(center ? ms_ : A(0)), mt(center ? mt_ : A(0)), es(0), et(0) {
    nan = x.probe != A(0);
    const bool flat_s = center ? x.s_lo == x.s_hi : device::acc_max(x.s_hi, -x.s_lo) == A(0);
    const bool flat_t = center ? x.t_lo == x.t_hi : device::acc_max(x.t_hi, -x.t_lo) == A(0);
    degenerate = flat_s || flat_t;
    acc_frexp(device::acc_max(x.s_hi - ms, ms - x.s_lo), &es);
    acc_frexp(device::acc_max(x.t_hi - mt, mt - x.t_lo), &et);
  }

  // Adds element (s, t) to pass 2's sums: u, v, u^2, v^2, u v of the scaled values.
  __device__ __forceinline__ void add(Sums<A, 5>& p, A s, A t) const {
    add_centred(p, acc_ldexp(s - ms, -es), acc_ldexp(t - mt, -et));
  }

  // The stats from pass 2's sums; the mean corrected by the centred values'
  // own mean (Chan, Golub and LeVeque's corrected two-pass algorithm).
  __device__ __forceinline__ Corr<A> finish(const Sums<A, 5>& p, int64_t D, bool center) const {
    if (nan) {
      const A q = std::numeric_limits<A>::quiet_NaN();
      return {ms, mt, q, q, q};
    }
    if (degenerate) return {ms, mt, A(0), A(0), A(0)};
    Sums<A, 5> c = p;
    A cu = A(0), cv = A(0);
    if (center) correct_mean(c, D, cu, cv);
    const A ru = acc_sqrt(c.v[2]), rv = acc_sqrt(c.v[3]);
    return {ms + acc_ldexp(cu, es), mt + acc_ldexp(cv, et), acc_ldexp(ru, es),
            acc_ldexp(rv, et), c.v[4] / ru / rv};
  }
};

// w = |u| |v| / (|u| |v| + eps), without the product |u| |v|.
template <typename A>
__device__ __forceinline__ A eps_weight(A nu, A nv) {
  return A(1) / (A(1) + static_cast<A>(kCorrelationEps) / nu / nv);
}

// Stores row r's stats and its distance 1 - <u, v> / (|u| |v| + eps) =
// 1 - cos w, or 1 for a degenerate row (|u| = 0 or |v| = 0).
template <typename S, typename U, typename A>
__device__ __forceinline__ void store_row(const CorrForwardArgs<S, U, A>& args, int64_t r,
                                          const Corr<A>& c) {
  A* st = args.stats + r * correlation_distance_stats::kCols;
  st[correlation_distance_stats::kMeanStudent] = c.ms;
  st[correlation_distance_stats::kMeanTeacher] = c.mt;
  st[correlation_distance_stats::kNormStudent] = c.nu;
  st[correlation_distance_stats::kNormTeacher] = c.nv;
  st[correlation_distance_stats::kCosine] = c.cos;
  args.rows[r] = (c.nu == A(0) || c.nv == A(0)) ? A(1)
                                                  : A(1) - c.cos * eps_weight(c.nu, c.nv);
}

// Row r's backward, read from the stats: with un = (s - ms) / |u| and vn =
// (t - mt) / |v| (entries in [-1, 1] whatever the magnitudes; the means are 0
// without centring, so one path serves cosine and Pearson), ds = as un + bs
// vn and dt = at vn + bt un, where, for the row's upstream gradient g,
//   as = g cos w pu, bs = -g pu, at = g cos w pv, bt = -g pv,
// pu = w / |u| = 1 / (|u| + eps / |v|), pv = w / |v| = 1 / (|v| + eps / |u|)
// (w itself underflows for tiny rows, pu does not); all 0 for a degenerate row.
template <typename A>
struct CorrGrad {
  A ms, mt, iu, iv, as, bs, at, bt;

  __device__ __forceinline__ void grads(A s, A t, A& ds, A& dt) const {
    const A un = (s - ms) * iu, vn = (t - mt) * iv;
    ds = as * un + bs * vn;
    dt = at * vn + bt * un;
  }
};

template <typename A>
__device__ __forceinline__ CorrGrad<A> corr_grad(const A* stats, const A* grad_rows, int64_t r) {
  const A* st = stats + r * correlation_distance_stats::kCols;
  const A nu = st[correlation_distance_stats::kNormStudent];
  const A nv = st[correlation_distance_stats::kNormTeacher];
  const A cos = st[correlation_distance_stats::kCosine];
  CorrGrad<A> c{st[correlation_distance_stats::kMeanStudent],
                st[correlation_distance_stats::kMeanTeacher],
                A(0), A(0), A(0), A(0), A(0), A(0)};
  if (nu == A(0) || nv == A(0)) return c;
  const A g = grad_rows[r];
  const A eps = static_cast<A>(kCorrelationEps);
  const A pu = A(1) / (nu + eps / nv), pv = A(1) / (nv + eps / nu);
  const A gcw = g * cos * eps_weight(nu, nv);
  c.iu = A(1) / nu;
  c.iv = A(1) / nv;
  c.as = gcw * pu;
  c.bs = -g * pu;
  c.at = gcw * pv;
  c.bt = -g * pv;
  return c;
}

// inner == 1: row r is elements [r * s_row, r * s_row + D) of the student
// and [r * t_row, r * t_row + D) of the teacher (rows read in place), and
// [r * D, (r + 1) * D) of the gradients. The packs' phase is taken from the
// student's offset, every tensor's when `aligned` is set.
template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    correlation_distance_rows_forward_kernel(const CorrForwardArgs<S, U, A> args) {
  constexpr int kVec = pack_width<S, U>();
  __shared__ Sums<A, 2> mean_smem[kBlockThreads / kWarpSize];
  __shared__ Sums<A, 5> prod_smem[kBlockThreads / kWarpSize];
  __shared__ Extremes<A> extremes_smem[kBlockThreads / kWarpSize];
  const int lane = threadIdx.x % kRowThreads;
  const int cols = static_cast<int>(args.D);

  for (int64_t r = first_row<kBlockThreads, kRowThreads>(); r < args.outer;
       r += row_stride<kBlockThreads, kRowThreads>()) {
    const int64_t start = r * args.s_row;
    const S* s = args.student + start;
    const U* t = args.teacher + r * args.t_row;
    // Calls f(s_j, t_j) for this thread's elements of the row, in packs.
    auto each = [&](auto&& f) {
      for_each_pack<kVec>(start, cols, args.aligned, lane, kRowThreads, [&](int j, auto n) {
        constexpr int N = decltype(n)::value;
        A sv[N], tv[N];
        load_pack<N>(s + j, sv);
        load_pack<N>(t + j, tv);
#pragma unroll
        for (int k = 0; k < N; ++k) f(sv[k], tv[k]);
      });
    };
    A ms = A(0), mt = A(0);
    if (args.center) {
      Sums<A, 2> m{{A(0), A(0)}};
      each([&](A sj, A tj) {
        m.v[0] += sj;
        m.v[1] += tj;
      });
      m = group_allreduce<kRowThreads>(m, mean_smem);
      ms = m.v[0] / static_cast<A>(args.D);
      mt = m.v[1] / static_cast<A>(args.D);
    }
    Sums<A, 5> p{{A(0), A(0), A(0), A(0), A(0)}};
    each([&](A sj, A tj) { add_centred(p, sj - ms, tj - mt); });
    p = group_allreduce<kRowThreads>(p, prod_smem);
    if (args.center) correct_mean(p, args.D, ms, mt);
    // Uniform over the row's threads (all-reduced values).
    if (sums_hold(ms, mt, p.v[2], p.v[3], p.v[4], args.D)) {
      if (lane == 0) store_row(args, r, corr_from_sums(ms, mt, p.v[2], p.v[3], p.v[4]));
      continue;
    }
    Extremes<A> x = extremes_empty<A>();
    each([&](A sj, A tj) { extremes_add(x, sj, tj); });
    const Careful<A> care(group_allreduce<kRowThreads>(x, extremes_smem), ms, mt, args.center);
    Sums<A, 5> q{{A(0), A(0), A(0), A(0), A(0)}};
    each([&](A sj, A tj) { care.add(q, sj, tj); });
    q = group_allreduce<kRowThreads>(q, prod_smem);
    if (lane == 0) store_row(args, r, care.finish(q, args.D, args.center));
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
    const int64_t start = r * args.s_row;  // the packs' phase
    const S* s = args.student + start;
    const U* t = args.teacher + r * args.t_row;
    S* gs = args.grad_student + r * args.D;
    U* gt = args.grad_teacher == nullptr ? nullptr : args.grad_teacher + r * args.D;
    const CorrGrad<A> c = corr_grad(args.stats, args.grad_rows, r);
    for_each_pack<kVec>(start, cols, args.aligned, lane, kRowThreads, [&](int j, auto n) {
      constexpr int N = decltype(n)::value;
      A sv[N], tv[N], ds[N], dt[N];
      load_pack<N>(s + j, sv);
      load_pack<N>(t + j, tv);
#pragma unroll
      for (int k = 0; k < N; ++k) c.grads(sv[k], tv[k], ds[k], dt[k]);
      store_pack<N>(gs + j, ds);
      if (gt != nullptr) store_pack<N>(gt + j, dt);
    });
  }
}

// Sum over the kSlices threads that share a row (threadIdx.x = slice *
// kTileRows + lane), added in slice order so that all of them get the same
// value. Every thread of the block must call it; `smem` may be reused by the
// next call: the leading barrier waits for its readers.
template <typename V>
__device__ __forceinline__ V slice_allreduce(V v, V (&smem)[kSlices][kTileRows]) {
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
  __shared__ Sums<A, 5> prod_smem[kSlices][kTileRows];
  __shared__ Extremes<A> extremes_smem[kSlices][kTileRows];
  __shared__ int careful_rows;
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
    Sums<A, 5> p{{A(0), A(0), A(0), A(0), A(0)}};
    if (live) {
      for (int64_t e = first; e < end; e += step) {
        add_centred(p, static_cast<A>(args.student[e]) - ms, static_cast<A>(args.teacher[e]) - mt);
      }
    }
    p = slice_allreduce(p, prod_smem);
    if (args.center) correct_mean(p, args.D, ms, mt);
    const bool hold = !live || sums_hold(ms, mt, p.v[2], p.v[3], p.v[4], args.D);
    if (live && hold && slice == 0) {
      store_row(args, r, corr_from_sums(ms, mt, p.v[2], p.v[3], p.v[4]));
    }
    // The careful path, when a row of the tile needs it: block-wide, for the
    // barriers; only those rows store its result.
    if (threadIdx.x == 0) careful_rows = 0;
    __syncthreads();
    if (!hold) atomicOr(&careful_rows, 1);
    __syncthreads();
    if (careful_rows == 0) continue;
    Extremes<A> x = extremes_empty<A>();
    if (live) {
      for (int64_t e = first; e < end; e += step) {
        extremes_add(x, static_cast<A>(args.student[e]), static_cast<A>(args.teacher[e]));
      }
    }
    const Careful<A> care(slice_allreduce(x, extremes_smem), ms, mt, args.center);
    Sums<A, 5> q{{A(0), A(0), A(0), A(0), A(0)}};
    if (live && !hold) {
      for (int64_t e = first; e < end; e += step) {
        care.add(q, static_cast<A>(args.student[e]), static_cast<A>(args.teacher[e]));
      }
    }
    q = slice_allreduce(q, prod_smem);
    if (!hold && slice == 0) store_row(args, r, care.finish(q, args.D, args.center));
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
      A ds, dt;
      c.grads(static_cast<A>(args.student[e]), static_cast<A>(args.teacher[e]), ds, dt);
      args.grad_student[e] = static_cast<S>(ds);
      if (args.grad_teacher != nullptr) args.grad_teacher[e] = static_cast<U>(dt);
    }
  }
}

// ---------------------------------------------------------------- host side

PointwiseLayout pointwise_layout(const PointwiseRows& rows) {
  return {rows.student.numel(), rows.len, rows.s_row, rows.t_row};
}

// The grid depends on numel alone (units of kVec elements), so the forward's
// partials, hence its sum, do too.
template <typename S, typename U>
void launch_pointwise_forward(const PointwiseRows& rows, PointwiseOp op, at::Tensor& out) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  PointwiseForwardArgs<S, U, A> args;
  args.student = rows.student.data_ptr<S>();
  args.teacher = rows.teacher.data_ptr<U>();
  args.layout = pointwise_layout(rows);
  args.op = op;
  const int64_t units = (args.layout.numel + kVec - 1) / kVec;
  const int blocks = static_cast<int>(
      std::min<int64_t>(kMaxPartials, (units + kBlockThreads - 1) / kBlockThreads));
  at::Tensor partials = at::empty({blocks}, out.options());
  args.partials = partials.data_ptr<A>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    const auto kernel = rows.flat() ? pointwise_distance_forward_kernel<S, U, A, false>
                                    : pointwise_distance_forward_kernel<S, U, A, true>;
    kernel<<<blocks, kBlockThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  pointwise_distance_sum_partials_kernel<A>
      <<<1, kBlockThreads, 0, stream>>>(args.partials, blocks, out.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename U>
void launch_pointwise_backward(const at::Tensor& grad, const PointwiseRows& rows, PointwiseOp op,
                               at::Tensor& gs, at::Tensor& gt, bool teacher_grad) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  PointwiseBackwardArgs<S, U, A> args;
  args.grad = grad.data_ptr<A>();
  args.student = rows.student.data_ptr<S>();
  args.teacher = rows.teacher.data_ptr<U>();
  args.grad_student = gs.data_ptr<S>();
  args.grad_teacher = teacher_grad ? gt.data_ptr<U>() : nullptr;
  args.layout = pointwise_layout(rows);
  args.op = op;
  const int64_t units = (args.layout.numel + kVec - 1) / kVec;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto kernel = rows.flat() ? pointwise_distance_backward_kernel<S, U, A, false>
                                  : pointwise_distance_backward_kernel<S, U, A, true>;
  kernel<<<grid_for(units, kBlockThreads), kBlockThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An input as the kernels read it: with inner == 1, rows (o, :, 0) whose
// elements are contiguous are read in place at any row stride (slices such as
// x[:, :D]), as on the CPU; anything else is made contiguous.
at::Tensor corr_input(const at::Tensor& x) {
  return x.size(2) == 1 && (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

// The row kernels use packs when every base pointer is aligned to one and
// every row starts at the same phase of a pack: all row strides equal (the
// gradients' being D) or all whole packs.
template <int kVec>
bool rows_aligned(bool pointers_aligned, int64_t outer, int64_t D, int64_t s_row, int64_t t_row,
                  bool with_grads) {
  const bool same = s_row == t_row && (!with_grads || s_row == D);
  const bool whole = s_row % kVec == 0 && t_row % kVec == 0 && (!with_grads || D % kVec == 0);
  return pointers_aligned && (same || whole || outer == 1);
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
  args.s_row = args.inner == 1 ? s.stride(0) : args.D;
  args.t_row = args.inner == 1 ? t.stride(0) : args.D;
  args.center = center;
  args.aligned = rows_aligned<kVec>(
      pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher), args.outer, args.D,
      args.s_row, args.t_row, false);
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
  args.s_row = args.inner == 1 ? s.stride(0) : args.D;
  args.t_row = args.inner == 1 ? t.stride(0) : args.D;
  args.aligned = rows_aligned<kVec>(pack_aligned<kVec>(args.student) &&
                                        pack_aligned<kVec>(args.teacher) &&
                                        pack_aligned<kVec>(args.grad_student) &&
                                        (!teacher_grad || pack_aligned<kVec>(args.grad_teacher)),
                                    args.outer, args.D, args.s_row, args.t_row, true);
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
  const PointwiseRows rows = pointwise_rows(student, teacher);
  at::Tensor out = at::empty({}, student.options().dtype(acc_scalar_type(student)));
  dispatch_input_types(rows.student, "student", rows.teacher, "teacher",
                       [&]<typename S, typename U>() {
    launch_pointwise_forward<S, U>(rows, op, out);
  });
  return out;
}

// The gradients are contiguous whatever the inputs' layout.
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
  at::Tensor gs = at::empty(student.sizes(), student.options());
  at::Tensor gt = teacher_grad ? at::empty(teacher.sizes(), teacher.options())
                               : at::empty({0}, teacher.options());
  if (student.numel() == 0) return {gs, gt};
  const PointwiseRows rows = pointwise_rows(student, teacher);
  dispatch_input_types(rows.student, "student", rows.teacher, "teacher",
                       [&]<typename S, typename U>() {
    launch_pointwise_backward<S, U>(grad, rows, op, gs, gt, teacher_grad);
  });
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, bool center) {
  check_distance_inputs(student, teacher, 3);
  check_row_fits(student.size(1), student.size(2));
  device_error_record(student);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = corr_input(student);
  const at::Tensor t = corr_input(teacher);
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
  const at::Tensor s = corr_input(student);
  const at::Tensor t = corr_input(teacher);
  const at::Tensor g = grad_rows.contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor gs = at::empty(s.sizes(), s.options());
  at::Tensor gt = teacher_grad ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());
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
