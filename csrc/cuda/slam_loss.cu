// CUDA kernels for slam_loss (docs/math.md §5); the math is in slam_loss.h,
// the stats layout in stats_layout.h, and the CPU kernel
// (csrc/cpu/slam_loss.cpp) is the reference for every stat the backward reads.
//
// Mapping: one row per block of kBlockThreads threads (a grid-stride loop
// over rows), so every row reduction stays in the block: warp shuffles, then
// the warps' partials merged in a fixed order (no floating-point atomics;
// deterministic).
//
// Forward, per row:
//   1. one pass over z and t: online log-sum-exp of z, the teacher's first
//      argmax, and the first radix digit histogram of the top-k select;
//   2. passes over t that finish the radix select of the k-th largest t
//      (the threshold thr, exact, with multiplicity; 11-bit digits over the
//      order-preserving bits of t >= 0: 3 passes for fp32, 6 for fp64, the
//      first fused into pass 1). It also yields ties = k - #(t > thr) and
//      the number of t == thr;
//   3. (soft mode) when fewer ties are taken than there are t == thr, a
//      radix select over the indices of those entries finds the index of the
//      ties-th one (the cut; members at the threshold are those up to it);
//   4. (soft mode) one pass over z and t summing the members' exact
//      t log q and h, and the non-members' t (log alpha + log f) and -t.
//      Hard mode reads z[yhat] only.
// Backward recomputes the member set from the saved threshold and ties (the
// cut select's first pass over t counts the entries at the threshold; more
// passes run only when some of them are left out), then writes
// dz = g (h - f S) in one pass over z and t (over z only in hard mode).
//
// Values are checked where they are read (device_errors.cuh), never on the
// host: the forward records alpha outside (0, 1], k outside [1 or 2, C]
// (clamped into it for the select) and a teacher row that is negative, NaN
// or does not sum to 1 within the tolerance, and gives that row a NaN loss;
// the backward records a saved argmax that names no class (hard mode; the
// row's gradient is then zero) and clamps the saved tie count into [1, C].
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "launch.cuh"
#include "slam_loss.h"
#include "stats_layout.h"

namespace distillkit {
namespace {

using device::acc_t;
using device::BlockRadixSelect;
using device::for_each_pack;
using device::group_allreduce;
using device::kWarpSize;
using device::load_pack;
using device::nonneg_key;
using device::pack_width;
using device::store_pack;
using device::xmul;
using launch::grid_for;
using launch::kBlockThreads;
using launch::pack_aligned;

// Radix keys of teacher values in the accumulator type.
template <typename A>
using value_key_t = std::conditional_t<std::is_same_v<A, double>, uint64_t, uint32_t>;

template <typename A>
using ValueSelect = BlockRadixSelect<value_key_t<A>, kBlockThreads>;
using IndexSelect = BlockRadixSelect<uint32_t, kBlockThreads>;
// Both selects take turns on one shared buffer.
using SelectShared = device::RadixSelectShared<kBlockThreads>;

// The inputs' rows are read in place: the class dimension is contiguous, the
// row strides are any (slices such as logits[:, :V]); the gradient is
// contiguous. for_each_pack's phase is taken from the student's row offset,
// which is the phase of every tensor's row when `aligned` is set (host side:
// every row stride equal, or every one a whole number of packs).
struct SlamScalars {
  int64_t rows;
  int cols;
  int64_t s_stride;  // student row stride, in elements
  int64_t t_stride;  // teacher row stride, in elements
  bool normalized;
  bool hard;
  bool aligned;  // every tensor's rows start at the same phase of a pack
  double sum_tolerance;  // how far a teacher row's sum may be from 1
};

template <typename S, typename T, typename A>
struct ForwardArgs {
  const S* student;
  const T* teacher;
  const A* alpha;     // (N,)
  const int64_t* k;   // (N,)
  A* loss;            // (N,)
  A* stats;           // (N, slam_loss_stats::kCols)
  int64_t* errors;    // the input error record
  SlamScalars p;
};

template <typename S, typename T, typename A>
struct BackwardArgs {
  const A* grad_loss;  // (N,)
  const S* student;
  const T* teacher;
  const A* alpha;
  const int64_t* k;
  const A* stats;      // (N, slam_loss_stats::kCols), from either backend's forward
  S* grad_student;
  int64_t* errors;     // the input error record
  SlamScalars p;
};

// x / q for q > 0 below 2^100 and |x / q| in range, without the out-of-line
// slow path of the IEEE division (or reciprocal): its call sites (in the
// unrolled pack loops of the backward, and c = 1 / (k - 1) in Mix) made ptxas
// spill around them (12/44 B of spill stores/loads in the 16-bit kernels, a
// few bytes elsewhere with other register allocations). An
// approximate reciprocal, then one step on the exact residual x - y q, give
// the quotient to within an ulp. A q below 2^-100 (fp64: 2^-1000) is scaled
// by 2^64 (2^600) first, exactly, so that the reciprocal's argument is
// normal. The emulator's host build divides.
#if defined(__CUDA_ARCH__)
// The approximate reciprocal (fp32: ~1 ulp; fp64: ~20 bits, refined by two
// Newton steps), of a normal argument.
__device__ __forceinline__ float rcp_approx(float q) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(q));
  return r;
}
__device__ __forceinline__ double rcp_approx(double q) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(q));
  r = fma(r, fma(-q, r, 1.0), r);
  return fma(r, fma(-q, r, 1.0), r);
}
#endif

template <typename A>
__device__ __forceinline__ A div_fast(A x, A q) {
#if defined(__CUDA_ARCH__)
  constexpr bool kF32 = std::is_same_v<A, float>;
  const A scale = q < A(kF32 ? 0x1p-100 : 0x1p-1000) ? A(kF32 ? 0x1p64 : 0x1p600) : A(1);
  x *= scale;
  q *= scale;
  const A r = rcp_approx(q);
  const A y = x * r;
  return fma(fma(-y, q, x), r, y);
#else
  return x / q;
#endif
}

// The mixing constants of a row, as in the CPU kernel: c = 1 or 1/(k-1),
// b = (1 - alpha) c, a = alpha - b. The products are unfused so that b is
// exactly 0 when alpha is 1 and a is rounded as on the CPU.
template <typename A>
struct Mix {
  A alpha;
  A log_alpha;
  A b;
  A a;
  A c;
  A one_minus_alpha;
  A one_minus_c;

  __device__ __forceinline__ Mix(A alpha_, int64_t k, bool normalized) : alpha(alpha_) {
    c = normalized ? div_fast(A(1), static_cast<A>(k - 1)) : A(1);
    one_minus_alpha = A(1) - alpha;
    one_minus_c = A(1) - c;
    b = device::mul_rn(one_minus_alpha, c);
    a = alpha - b;
    log_alpha = device::acc_log(alpha);
  }

  // log q and h / t = -f a / q of a member with log f = log_f.
  __device__ __forceinline__ void member(A log_f, A& log_q, A& h_over_t) const {
    const A f = device::acc_exp(log_f);
    if (b == A(0)) {  // alpha = 1: q = f exactly
      log_q = log_alpha + log_f;
      h_over_t = A(-1);
      return;
    }
    // As on the CPU: q = alpha f + b (1 - f), two non-negative terms, with
    // 1 - f = -expm1(log f) exact when f is near 1, q >= min(b, alpha) > 0;
    // near q = 1, log q = log1p(-(1 - q)), 1 - q = (1 - alpha) ((1 - c) + c f)
    // + alpha (1 - f), non-negative terms too (c <= 1).
    const A one_minus_f = -device::acc_expm1(log_f);
    const A q = device::mul_rn(alpha, f) + device::mul_rn(b, one_minus_f);
    log_q = q < A(0.5) ? device::acc_log(q)
                       : device::acc_log1p(-(device::mul_rn(one_minus_alpha,
                                                            one_minus_c + device::mul_rn(c, f)) +
                                             device::mul_rn(alpha, one_minus_f)));
    h_over_t = div_fast(-f * a, q);
  }
};

// lse(z) as its two parts, as on the CPU: m = max z and ls = log sum
// exp(z - m) = log1p(s'). log f = (z - m) - ls keeps its digits for logits
// far from 0 (z - m is exact near the maximum), which z - (m + ls) would not.
template <typename A>
struct RowLse {
  A m;
  A ls;
  __device__ __forceinline__ A log_f(A z) const { return (z - m) - ls; }
};

// Running m = max z, with s' = sum exp(z - m) - 1 kept as lt = sum exp(z - m)
// over z < m plus eq = the number of z == m (s' = lt + (eq - 1)), as the CPU's
// row_lse: the maximum's 1 is counted, not summed, so a confident row keeps
// 1 - f_max = -expm1(-log1p(s')) to its digits, which log(1 + s') would round
// away. Every update adds non-negative terms (no cancellation). Empty: m =
// -inf. A NaN z makes lt NaN (the compares skip it, exp does not).
template <typename A>
struct OnlineLse1p {
  A m;
  A lt;
  A eq;  // a count, exact in A (at most C / threads per thread before merges)

  static __device__ __forceinline__ OnlineLse1p empty() {
    return {device::neg_inf<A>(), A(0), A(0)};
  }

  template <int N>
  __device__ __forceinline__ void add(const A (&x)[N]) {
    A mx = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = device::acc_max(mx, x[i]);
    if (mx > m) {  // the old terms are all below the new maximum
      lt = (lt + eq) * device::acc_exp(m - mx);  // exp(-inf) = 0 for an empty state
      eq = A(0);
      m = mx;
    }
    // All -inf so far: exp(x - 0) = 0, not exp(-inf - -inf).
    const A ref = m == device::neg_inf<A>() ? A(0) : m;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool top = x[i] == m;
      lt += top ? A(0) : device::acc_exp(x[i] - ref);
      eq += top ? A(1) : A(0);
    }
  }

  __device__ __forceinline__ RowLse<A> finish() const {
    return {m, device::acc_log1p(lt + (eq - A(1)))};
  }
};

// Commutative bitwise (the butterfly merges (x, y) on one lane and (y, x) on
// its partner): the larger m's sums are kept, the smaller's rescaled into lt.
template <typename A>
__device__ __forceinline__ OnlineLse1p<A> merge(const OnlineLse1p<A>& x,
                                                const OnlineLse1p<A>& y) {
  if (x.m == y.m) return {x.m, x.lt + y.lt, x.eq + y.eq};
  // Selected by value: references to one of two locals would put both in
  // local memory.
  const bool x_hi = x.m > y.m;
  const A hi_m = x_hi ? x.m : y.m, hi_lt = x_hi ? x.lt : y.lt, hi_eq = x_hi ? x.eq : y.eq;
  const A lo_m = x_hi ? y.m : x.m, lo_lt = x_hi ? y.lt : x.lt, lo_eq = x_hi ? y.eq : x.eq;
  return {hi_m, hi_lt + (lo_lt + lo_eq) * device::acc_exp(lo_m - hi_m), hi_eq};
}

template <typename A>
__device__ __forceinline__ OnlineLse1p<A> shfl_xor(const OnlineLse1p<A>& v, int mask) {
  return {device::shfl_xor(v.m, mask), device::shfl_xor(v.lt, mask),
          device::shfl_xor(v.eq, mask)};
}

// The top-k set: t > thr, plus the entries t == thr up to index `cut` (the
// first `ties` of them in index order).
template <typename A>
struct Members {
  A thr;
  int cut;
  __device__ __forceinline__ bool contains(A t, int col) const {
    return t > thr || (t == thr && col <= cut);
  }
};

// The teacher's first argmax: the larger value wins, equal values go to the
// lower index (a commutative merge, as the butterfly needs).
template <typename A>
struct ArgMax {
  A value;
  int index;
};

template <typename A>
__device__ __forceinline__ ArgMax<A> merge(const ArgMax<A>& x, const ArgMax<A>& y) {
  if (x.value != y.value) return x.value > y.value ? x : y;
  return x.index < y.index ? x : y;
}

template <typename A>
__device__ __forceinline__ ArgMax<A> shfl_xor(const ArgMax<A>& v, int mask) {
  return {device::shfl_xor(v.value, mask), __shfl_xor_sync(0xffffffffu, v.index, mask)};
}

// Pass 1 state: online lse of z, the teacher's argmax, and for the value
// check the teacher's sum and its number of negative or NaN entries.
template <typename A>
struct RowHead {
  OnlineLse1p<A> z;
  ArgMax<A> top;
  A t_sum;
  A t_bad;
};

template <typename A>
__device__ __forceinline__ RowHead<A> merge(const RowHead<A>& x, const RowHead<A>& y) {
  return {merge(x.z, y.z), merge(x.top, y.top), x.t_sum + y.t_sum, x.t_bad + y.t_bad};
}

template <typename A>
__device__ __forceinline__ RowHead<A> shfl_xor(const RowHead<A>& v, int mask) {
  return {shfl_xor(v.z, mask), shfl_xor(v.top, mask), device::shfl_xor(v.t_sum, mask),
          device::shfl_xor(v.t_bad, mask)};
}

// Soft-mode sums of the forward's member pass. With t > 0 only (xlogy):
// members give t log q and t (h / t); non-members give t and t log f.
template <typename A>
struct SoftSums {
  A t_sum;     // all t
  A rest_t;    // non-members' t
  A rest_tlf;  // non-members' t log f
  A m_tlogq;   // members' t log q
  A m_h;       // members' h
};

template <typename A>
__device__ __forceinline__ SoftSums<A> merge(const SoftSums<A>& x, const SoftSums<A>& y) {
  return {x.t_sum + y.t_sum, x.rest_t + y.rest_t, x.rest_tlf + y.rest_tlf,
          x.m_tlogq + y.m_tlogq, x.m_h + y.m_h};
}

template <typename A>
__device__ __forceinline__ SoftSums<A> shfl_xor(const SoftSums<A>& v, int mask) {
  return {device::shfl_xor(v.t_sum, mask), device::shfl_xor(v.rest_t, mask),
          device::shfl_xor(v.rest_tlf, mask), device::shfl_xor(v.m_tlogq, mask),
          device::shfl_xor(v.m_h, mask)};
}

// The index of the ties-th entry with t == thr (in index order), or cols - 1
// when all `count_eq` of them are taken. A radix select of the ties-th largest
// key cols-1-i over those entries. count_eq < 0 means unknown: the first
// pass counts them, and the select stops there when all are taken.
template <int kVec, typename T, typename A>
__device__ int tie_cut(const T* t, int64_t row_start, const SlamScalars& p, A thr, int ties,
                       int count_eq, SelectShared& sh) {
  if (count_eq >= 0 && ties >= count_eq) return p.cols - 1;
  const int key_bits = max(1, 32 - __clz(p.cols - 1));  // keys < cols
  IndexSelect sel(sh, key_bits, ties);
  while (!sel.done()) {
    sel.begin_pass();
    for_each_pack<kVec>(row_start, p.cols, p.aligned, threadIdx.x, kBlockThreads,
                        [&](int col, auto n) {
                          constexpr int N = decltype(n)::value;
                          A tr[N];
                          load_pack<N>(t + col, tr);
#pragma unroll
                          for (int i = 0; i < N; ++i) {
                            if (tr[i] == thr) sel.count(static_cast<uint32_t>(p.cols - 1 - (col + i)));
                          }
                        });
    sel.end_pass();
    if (count_eq < 0) {
      count_eq = sel.total;
      if (ties >= count_eq) return p.cols - 1;
    }
  }
  return p.cols - 1 - static_cast<int>(sel.value());
}

// Blocks per SM the kernels are compiled for (at most 64 registers; fp64:
// 128): without it, ptxas picks its own occupancy target and spilled
// (48 registers, 14/24 B in the 16-bit forward) where 64 hold everything.
constexpr int kMinBlocks = 4;
template <typename A>
constexpr int kMinBlocksFor = sizeof(A) == 8 ? 2 : kMinBlocks;

template <typename S, typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksFor<A>)
    slam_loss_forward_kernel(const ForwardArgs<S, T, A> args) {
  constexpr int kVec = pack_width<S, T>();
  using Key = value_key_t<A>;
  __shared__ SelectShared select_smem;
  __shared__ RowHead<A> head_smem[kBlockThreads / kWarpSize];
  __shared__ SoftSums<A> sums_smem[kBlockThreads / kWarpSize];
  const SlamScalars& p = args.p;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t row_start = row * p.s_stride;  // the packs' phase
    const S* z = args.student + row_start;
    const T* t = args.teacher + row * p.t_stride;
    // A k outside [k_min, C] is recorded and clamped, so the select always
    // has its k keys.
    const int64_t k_min = p.normalized ? 2 : 1;
    const int64_t k_in = args.k[row];
    const int64_t k = k_in < k_min ? k_min : k_in > p.cols ? int64_t{p.cols} : k_in;
    bool bad_row = k != k_in;
    if (bad_row && tid == 0) {
      device::record_input_error(args.errors, InputError::kK, row, -1, k_in, p.cols, k_min);
    }
    const A alpha = args.alpha[row];
    if (!(alpha > A(0) && alpha <= A(1))) {
      bad_row = true;
      if (tid == 0) {
        device::record_input_error(args.errors, InputError::kAlpha, row, -1,
                                   __double_as_longlong(static_cast<double>(alpha)), 0);
      }
    }

    // 1. lse(z), argmax t, and the select's first digit.
    ValueSelect<A> sel(select_smem, 8 * sizeof(Key), static_cast<int>(k));
    sel.begin_pass();
    RowHead<A> head{OnlineLse1p<A>::empty(), {A(-1), std::numeric_limits<int>::max()}, A(0),
                    A(0)};
    for_each_pack<kVec>(row_start, p.cols, p.aligned, tid, kBlockThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A zr[N], tr[N];
      load_pack<N>(z + col, zr);
      load_pack<N>(t + col, tr);
      head.z.add(zr);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        head.top = merge(head.top, ArgMax<A>{tr[i], col + i});
        sel.count(nonneg_key(tr[i]));
        head.t_sum += tr[i];
        head.t_bad += tr[i] >= A(0) ? A(0) : A(1);  // NaN counts too
      }
    });
    sel.end_pass();
    head = group_allreduce<kBlockThreads>(head, head_smem);
    const RowLse<A> lse = head.z.finish();
    // A NaN row has no argmax: its index stays past the row, so take 0.
    const int yhat = head.top.index < p.cols ? head.top.index : 0;
    if (head.t_bad > A(0)) {
      bad_row = true;
      if (tid == 0) {
        device::record_input_error(args.errors, InputError::kTeacherNegative, row, -1, 0, 0);
      }
    } else if (!(device::acc_abs(head.t_sum - A(1)) <= static_cast<A>(p.sum_tolerance))) {
      bad_row = true;
      if (tid == 0) {
        device::record_input_error(args.errors, InputError::kTeacherSum, row, -1,
                                   __double_as_longlong(static_cast<double>(head.t_sum)), 0,
                                   __double_as_longlong(p.sum_tolerance));
      }
    }

    // 2. The rest of the threshold select.
    while (!sel.done()) {
      sel.begin_pass();
      for_each_pack<kVec>(row_start, p.cols, p.aligned, tid, kBlockThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        A tr[N];
        load_pack<N>(t + col, tr);
#pragma unroll
        for (int i = 0; i < N; ++i) sel.count(nonneg_key(tr[i]));
      });
      sel.end_pass();
    }
    const A thr = device::key_value(sel.value());
    const int ties = sel.rank();
    const int count_eq = sel.bin_count;  // the last bin holds exactly the keys equal to thr

    const Mix<A> mix(alpha, k, p.normalized);
    A loss, s, t_sum;
    if (p.hard) {
      // yhat is always a member (rank 0 of the top-k order).
      A log_q, h_over_t;
      mix.member(lse.log_f(static_cast<A>(z[yhat])), log_q, h_over_t);
      loss = -log_q;
      s = h_over_t;
      t_sum = A(1);
    } else {
      // 3. and 4.
      const Members<A> m{thr, tie_cut<kVec>(t, row_start, p, thr, ties, count_eq, select_smem)};
      SoftSums<A> sums{A(0), A(0), A(0), A(0), A(0)};
      for_each_pack<kVec>(row_start, p.cols, p.aligned, tid, kBlockThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        A zr[N], tr[N];
        load_pack<N>(z + col, zr);
        load_pack<N>(t + col, tr);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          sums.t_sum += tr[i];
          if (tr[i] == A(0)) continue;  // xlogy: 0 log q = 0
          if (m.contains(tr[i], col + i)) {
            A log_q, h_over_t;
            mix.member(lse.log_f(zr[i]), log_q, h_over_t);
            sums.m_tlogq += tr[i] * log_q;
            sums.m_h += tr[i] * h_over_t;
          } else {
            sums.rest_t += tr[i];
            sums.rest_tlf += tr[i] * lse.log_f(zr[i]);
          }
        }
      });
      sums = group_allreduce<kBlockThreads>(sums, sums_smem);
      // Non-members: log q = log alpha + log f.
      loss = -(sums.rest_t * mix.log_alpha + sums.rest_tlf + sums.m_tlogq);
      s = sums.m_h - sums.rest_t;
      t_sum = sums.t_sum;
    }

    if (tid == 0) {
      A* st = args.stats + row * slam_loss_stats::kCols;
      args.loss[row] = bad_row ? std::numeric_limits<A>::quiet_NaN() : loss;
      st[slam_loss_stats::kMaxStudent] = lse.m;
      st[slam_loss_stats::kLogSumStudent] = lse.ls;
      st[slam_loss_stats::kThreshold] = thr;
      st[slam_loss_stats::kTies] = int_stat<A>(ties);
      st[slam_loss_stats::kTeacherArgmax] = int_stat<A>(yhat);
      st[slam_loss_stats::kTeacherMass] = t_sum;
      st[slam_loss_stats::kHSum] = s;
    }
  }
}

template <typename S, typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksFor<A>)
    slam_loss_backward_kernel(const BackwardArgs<S, T, A> args) {
  constexpr int kVec = pack_width<S, T>();
  __shared__ SelectShared select_smem;
  const SlamScalars& p = args.p;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t row_start = row * p.s_stride;  // the packs' phase
    const S* z = args.student + row_start;
    const T* t = args.teacher + row * p.t_stride;
    S* dz = args.grad_student + row * p.cols;
    const A* st = args.stats + row * slam_loss_stats::kCols;
    const RowLse<A> lse{st[slam_loss_stats::kMaxStudent], st[slam_loss_stats::kLogSumStudent]};
    const A s = st[slam_loss_stats::kHSum];
    const A g_in = args.grad_loss[row];
    // k and alpha may have changed since the forward: out of range, they are
    // recorded and the row's gradient is zero.
    const int64_t k_min = p.normalized ? 2 : 1;
    const int64_t k = args.k[row];
    const A alpha = args.alpha[row];
    const bool bad_k = k < k_min || k > p.cols;
    const bool bad_alpha = !(alpha > A(0) && alpha <= A(1));
    if (tid == 0 && bad_k) {
      device::record_input_error(args.errors, InputError::kK, row, -1, k, p.cols, k_min);
    }
    if (tid == 0 && bad_alpha) {
      device::record_input_error(args.errors, InputError::kAlpha, row, -1,
                                 __double_as_longlong(static_cast<double>(alpha)), 0);
    }
    const A g = bad_k || bad_alpha ? A(0) : g_in;
    const Mix<A> mix(bad_alpha ? A(1) : alpha, bad_k ? k_min : k, p.normalized);

    if (p.hard) {
      // h is 0 everywhere but at yhat, where t is taken as 1. A saved yhat
      // that names no class is recorded and gives a zero gradient.
      const int64_t yhat = stat_int(st[slam_loss_stats::kTeacherArgmax]);
      const bool valid = yhat >= 0 && yhat < p.cols;
      if (!valid && tid == 0) {
        device::record_input_error(args.errors, InputError::kStatsIndex, row,
                                   slam_loss_stats::kTeacherArgmax, yhat, p.cols);
      }
      for_each_pack<kVec>(row_start, p.cols, p.aligned, tid, kBlockThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        A zr[N], gz[N];
        load_pack<N>(z + col, zr);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const A log_f = lse.log_f(zr[i]);
          A h = A(0);
          if (col + i == yhat) {
            A log_q;
            mix.member(log_f, log_q, h);
          }
          gz[i] = valid ? g * (h - device::acc_exp(log_f) * s) : A(0);
        }
        store_pack<N>(dz + col, gz);
      });
      continue;
    }

    const A thr = st[slam_loss_stats::kThreshold];
    // Clamped so the cut select always has its keys: stats that are not this
    // forward's give a wrong gradient, never an out-of-bounds access.
    const int64_t saved_ties = stat_int(st[slam_loss_stats::kTies]);
    const int ties = static_cast<int>(saved_ties < 1 ? 1 : saved_ties > p.cols ? p.cols : saved_ties);
    const Members<A> m{thr, tie_cut<kVec>(t, row_start, p, thr, ties, /*count_eq=*/-1,
                                          select_smem)};
    for_each_pack<kVec>(row_start, p.cols, p.aligned, tid, kBlockThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A zr[N], tr[N], gz[N];
      load_pack<N>(z + col, zr);
      load_pack<N>(t + col, tr);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A log_f = lse.log_f(zr[i]);
        A h = -tr[i];
        if (m.contains(tr[i], col + i)) {
          A log_q, h_over_t;
          mix.member(log_f, log_q, h_over_t);
          h = xmul(tr[i], h_over_t);
        }
        gz[i] = g * (h - device::acc_exp(log_f) * s);
      }
      store_pack<N>(dz + col, gz);
    });
  }
}

// ---------------------------------------------------------------- host side

// Columns are int indices on the device (ties and yhat are saved as integer
// bits, exact for every C, as on the CPU).
void check_cols_fit(const SlamLossParams& p) {
  launch::check_cols_fit(p.cols, "student_logits", "classes");
}

// Packs are used when every base pointer is aligned to one and every row
// starts at the same phase of a pack: all row strides equal (a contiguous
// batch, the gradient's stride being cols) or all whole packs.
template <int kVec>
SlamScalars make_scalars(const SlamLossParams& p, const at::Tensor& z, const at::Tensor& t,
                         bool pointers_aligned, bool with_grad) {
  const int64_t ss = z.stride(0), ts = t.stride(0);
  const bool same = ss == ts && (!with_grad || ss == p.cols);
  const bool whole = ss % kVec == 0 && ts % kVec == 0 && (!with_grad || p.cols % kVec == 0);
  return SlamScalars{p.rows,       static_cast<int>(p.cols), ss, ts, p.normalized, p.hard,
                     pointers_aligned && (same || whole || p.rows == 1),
                     teacher_sum_tolerance(t.scalar_type())};
}

// Rows are read in place when the class dimension is contiguous (any row
// stride), as on the CPU; otherwise a contiguous copy.
at::Tensor unit_stride_rows(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous();
}

template <typename S, typename T>
void launch_forward(const at::Tensor& z, const at::Tensor& t, const at::Tensor& alpha,
                    const at::Tensor& k, at::Tensor& loss, at::Tensor& stats,
                    int64_t* errors, const SlamLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, T>();
  ForwardArgs<S, T, A> args;
  args.student = z.data_ptr<S>();
  args.teacher = t.data_ptr<T>();
  args.alpha = alpha.data_ptr<A>();
  args.k = k.data_ptr<int64_t>();
  args.loss = loss.data_ptr<A>();
  args.stats = stats.data_ptr<A>();
  args.errors = errors;
  args.p = make_scalars<kVec>(
      p, z, t, pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher), false);
  slam_loss_forward_kernel<S, T, A>
      <<<grid_for(p.rows, 1), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename T>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& t,
                     const at::Tensor& alpha, const at::Tensor& k, const at::Tensor& stats,
                     at::Tensor& grad, int64_t* errors, const SlamLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, T>();
  BackwardArgs<S, T, A> args;
  args.grad_loss = grad_loss.data_ptr<A>();
  args.student = z.data_ptr<S>();
  args.teacher = t.data_ptr<T>();
  args.alpha = alpha.data_ptr<A>();
  args.k = k.data_ptr<int64_t>();
  args.stats = stats.data_ptr<A>();
  args.grad_student = grad.data_ptr<S>();
  args.errors = errors;
  args.p = make_scalars<kVec>(p, z, t,
                              pack_aligned<kVec>(args.student) &&
                                  pack_aligned<kVec>(args.teacher) &&
                                  pack_aligned<kVec>(args.grad_student),
                              true);
  slam_loss_backward_kernel<S, T, A>
      <<<grid_for(p.rows, 1), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> slam_loss_forward_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_probs, const at::Tensor& alpha,
    const at::Tensor& k, bool normalized, bool hard) {
  const SlamLossParams p = check_slam_loss_args(student_logits, teacher_probs, alpha, k,
                                               normalized, hard);
  check_cols_fit(p);
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor loss = at::empty({p.rows}, alpha.options());
  at::Tensor stats = at::empty({p.rows, slam_loss_stats::kCols}, alpha.options());
  if (p.rows == 0) return {loss, stats};

  const at::Tensor z = unit_stride_rows(student_logits);
  const at::Tensor t = unit_stride_rows(teacher_probs);
  const at::Tensor al = alpha.contiguous();
  const at::Tensor kk = k.contiguous();
  dispatch_input_types(z, "student_logits", t, "teacher_probs",
                       [&]<typename S, typename T>() {
    launch_forward<S, T>(z, t, al, kk, loss, stats, errors, p);
  });
  return {loss, stats};
}

at::Tensor slam_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                   const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                   const at::Tensor& k, const at::Tensor& stats, bool normalized,
                                   bool hard) {
  const SlamLossParams p = check_slam_loss_args(student_logits, teacher_probs, alpha, k,
                                               normalized, hard);
  check_slam_loss_backward_args(grad_loss, stats, student_logits, p);
  check_cols_fit(p);
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor grad = at::empty({p.rows, p.cols}, student_logits.options());
  if (p.rows == 0 || p.cols == 0) return grad;

  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor z = unit_stride_rows(student_logits);
  const at::Tensor t = unit_stride_rows(teacher_probs);
  const at::Tensor al = alpha.contiguous();
  const at::Tensor kk = k.contiguous();
  const at::Tensor st = stats.contiguous();
  dispatch_input_types(z, "student_logits", t, "teacher_probs",
                       [&]<typename S, typename T>() {
    launch_backward<S, T>(g, z, t, al, kk, st, grad, errors, p);
  });
  return grad;
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("slam_loss_forward", &distillkit::slam_loss_forward_cuda);
  m.impl("slam_loss_backward", &distillkit::slam_loss_backward_cuda);
}
