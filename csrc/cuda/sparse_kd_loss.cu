// CUDA kernels for sparse_kd_loss (docs/math.md §4); the math is in
// sparse_kd_loss.h, the stats layout in stats_layout.h.
//
// Mapping as in kd_loss.cu: one row per thread group, a warp for C <=
// kWarpRowMaxCols and the whole block otherwise, so a row's reductions never
// leave the block (no atomics; every loss is written once, deterministic).
//
// Forward: one streaming pass over z keeps an online log-sum-exp of z/T per
// thread; alongside, the group's threads split the row's K kept entries
// (strided by lane) and keep an online log-sum-exp of the teacher's l_k with
// the cross term sum exp(l_k - m) (l_k - z[I_k]/T) riding along, one gather
// of z per entry. Both states and the kept count are merged in a single
// group all-reduce. The teacher never exists as an N x C tensor.
//
// With the teacher's tail bucket (teacher_tail_logprob) the forward adds the
// tail to the teacher's merged state and takes a second pass over the row's K
// kept entries, now that both normalizers are known: the per-bucket terms of
// the divergence and the student's kept mass sum_k Q_k (its tail is
// log(1 - sum)), merged in a second group all-reduce.
//
// Backward recomputes q from the saved lse (no N x C buffer kept from the
// forward): one pass writes dz_j = c * mass * q_j for every column, a group
// barrier, then the threads owning the kept entries overwrite dz[I_k] with
// c * (mass * q_{I_k} - p_k), recomputed from z so that every element is
// rounded once. Indices are unique within a row (checked in the forward), so
// no element has two writers after the barrier.
//
// Indices are checked where they are read, in both kernels (the backward's
// may have been edited since the forward, e.g. in place through numpy): one
// outside [0, C) and not -1 is recorded (device_errors.cuh) and never
// dereferenced; the forward also records a class repeated within a row
// (O(K^2 / threads) compares per row) unless check_duplicates is off. The
// host never reads an index.
//
// The student's rows may be strided (a column slice of wider logits, e.g. a
// padded vocabulary): the kernels read z in place at row * z_stride, as the
// CPU kernels do; only a column stride other than 1 makes the host copy.
// The gradient is always a fresh contiguous (N, C) tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "launch.cuh"
#include "row_loss.h"
#include "sparse_kd_loss.h"
#include "stats_layout.h"

namespace distillkit {
namespace {

using device::acc_t;
using device::first_row;
using device::for_each_pack;
using device::group_allreduce;
using device::kWarpSize;
using device::load_pack;
using device::OnlineLSE;
using device::row_stride;
using device::store_pack;
using device::xmul;
using launch::kBlockThreads;
using launch::kWarpRowMaxCols;
using launch::pack_aligned;

// Per-launch scalars, resolved on the host in double and rounded once.
template <typename A>
struct SparseScalars {
  int64_t rows;
  int cols;
  int64_t z_stride;  // elements between the starts of two student rows
  int64_t k;
  int64_t ignore_index;
  bool has_labels;
  bool renormalize;
  bool check_duplicates;  // forward only
  // The student (and its gradient) base pointers are pack-aligned and, in the
  // backward, z and dz rows start at the same phase of a pack.
  bool aligned;
  bool has_tail;
  Divergence divergence;
  A beta;
  A log_beta, log_1m_beta;  // the JSD mixture's log weights
  A inv_t;
  A soft_scale;       // T^2 or 1
  A soft_grad_scale;  // soft_scale / T
};

template <typename S, typename L, typename A>
struct ForwardArgs {
  const S* student;      // (N, C), rows z_stride apart
  const int64_t* index;  // (N, K)
  const L* logprobs;     // (N, K)
  const L* tail;         // (N,) teacher_tail_logprob, nullptr without a tail
  const int64_t* labels; // nullptr without labels
  A* loss;               // (N,)
  A* stats;              // (N, sparse_kd_loss_stats::kCols)
  int64_t* errors;       // the input error record
  SparseScalars<A> k;
};

template <typename S, typename L, typename A>
struct BackwardArgs {
  const A* grad_loss;    // (N,)
  const S* student;
  const int64_t* index;
  const L* logprobs;
  const int64_t* labels; // nullptr without labels
  const A* stats;        // (N, sparse_kd_loss_stats::kCols), from the forward
  S* grad_student;
  int64_t* errors;       // the input error record
  SparseScalars<A> k;
};

// Entry e of a row's indices: its class, or -1 for padding and for an index
// outside [0, C), which is recorded and never dereferenced.
template <typename A>
__device__ __forceinline__ int64_t kept_class(const int64_t* index, int64_t e, int64_t row,
                                              const SparseScalars<A>& k, int64_t* errors) {
  const int64_t j = index[e];
  if (j >= k.cols || j < -1) {
    device::record_input_error(errors, InputError::kTeacherIndex, row, e, j, k.cols);
    return -1;
  }
  return j;
}

// Per-thread forward state: online lse of z/T; online lse of the kept l_k
// with t.a = sum exp(l_k - t.m) (l_k - z[I_k]/T); the number of kept entries
// (a float: it is merged with the same shuffles, and exact below 2^24).
template <typename A>
struct RowState {
  OnlineLSE<A> z;
  OnlineLSE<A> t;
  A kept;
};

template <typename A>
__device__ __forceinline__ RowState<A> merge(const RowState<A>& x, const RowState<A>& y) {
  return {device::merge(x.z, y.z), device::merge(x.t, y.t), x.kept + y.kept};
}

template <typename A>
__device__ __forceinline__ RowState<A> shfl_xor(const RowState<A>& v, int mask) {
  return {device::shfl_xor(v.z, mask), device::shfl_xor(v.t, mask),
          device::shfl_xor(v.kept, mask)};
}

// The second pass's sums (tail rows): the student's kept mass sum_k Q_k, and
// the kept buckets' terms of D (or KL(P || M)) and of KL(Q || M) (JSD).
template <typename A>
struct BucketSums {
  A kept_q;
  A d;
  A ds;
};

template <typename A>
__device__ __forceinline__ BucketSums<A> merge(const BucketSums<A>& x, const BucketSums<A>& y) {
  return {x.kept_q + y.kept_q, x.d + y.d, x.ds + y.ds};
}

template <typename A>
__device__ __forceinline__ BucketSums<A> shfl_xor(const BucketSums<A>& v, int mask) {
  return {device::shfl_xor(v.kept_q, mask), device::shfl_xor(v.d, mask),
          device::shfl_xor(v.ds, mask)};
}

// log M_b = log(beta P_b + (1 - beta) Q_b), as log-add-exp with log(1 + x)
// rather than log1p(x): with the fp64 log1p's longer code the fp64 backward
// spilled 16 B (ptxas, sm_90), and for x below eps, where the two differ,
// log M is off by at most eps absolutely either way.
template <typename A>
__device__ __forceinline__ A log_mix(A lp, A lq, const SparseScalars<A>& k) {
  const A a = k.log_beta + lp, b = k.log_1m_beta + lq;
  const A hi = device::acc_max(a, b), lo = device::acc_min(a, b);
  return hi == device::neg_inf<A>() ? hi : hi + device::acc_log(A(1) + device::acc_exp(lo - hi));
}

// Adds one bucket's terms (log P = lp, log Q = lq) to d and ds, 0 log 0 = 0.
template <typename A>
__device__ __forceinline__ void add_bucket(A lp, A lq, const SparseScalars<A>& k, A& d, A& ds) {
  const A P = device::acc_exp(lp), Q = device::acc_exp(lq);
  if (k.divergence == Divergence::ForwardKL) {
    d += xmul(P, lp - lq);
  } else if (k.divergence == Divergence::ReverseKL) {
    d += xmul(Q, lq - lp);
  } else {
    const A lm = log_mix(lp, lq, k);
    d += xmul(P, lp - lm);
    ds += xmul(Q, lq - lm);
  }
}

// G_b - Gbar of a bucket for reverse KL and JSD (docs/math.md §4.1); `dval`
// is the row's D (reverse) or D_s (JSD).
template <typename A>
__device__ __forceinline__ A bucket_bracket(A lp, A lq, A dval, const SparseScalars<A>& k) {
  if (k.divergence == Divergence::ReverseKL) return lq - lp - dval;
  return (A(1) - k.beta) * (lq - log_mix(lp, lq, k) - dval);
}

// A bucket's gradient factor Q_b (G_b - Gbar), the value d/d(z_j/T) at a kept
// class; 0 for an empty bucket.
template <typename A>
__device__ __forceinline__ A bucket_grad(A lp, A lq, A mass, A dval, const SparseScalars<A>& k) {
  const A Q = device::acc_exp(lq);
  if (k.divergence == Divergence::ForwardKL) return mass * Q - device::acc_exp(lp);
  return Q == A(0) ? A(0) : Q * bucket_bracket(lp, lq, dval, k);
}

// Makes the group's global writes so far visible to the whole group.
template <int kRowThreads>
__device__ __forceinline__ void group_sync() {
  if constexpr (kRowThreads == kWarpSize) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// a / s for the s of a non-empty online lse state, 1 <= s <= (entries added):
// the largest entry's own weight is 1, every other is at most 1. A plain `/`
// would do, but fp64 (and fp32) division compiles to a fast path plus a
// slow-path subroutine call, and in the warp-row fp64 forward the registers
// kept live across that call spilled to local memory (72 B per thread,
// benchmarks/results/cuda_resources_sm90.md). Instead: a linear seed for 1/s
// (relative error <= 1/17 on each binade), four Newton steps (error 1/17^16,
// below fp64's epsilon) and one residual correction of the quotient, which
// leaves it within an ulp of a / s. An infinite or NaN quotient is returned
// as a * r, as the division would give it. s = 0 (no entry) is the caller's.
template <typename A>
__device__ __forceinline__ A div_by_sum(A a, A s) {
  int e;
  const A m = frexp(s, &e);  // s = m 2^e, m in [1/2, 1)
  A r = ldexp(A(48.0 / 17.0) - A(32.0 / 17.0) * m, -e);
#pragma unroll
  for (int i = 0; i < 4; ++i) r = fma(r, fma(-s, r, A(1)), r);
  const A q = a * r;
  return device::acc_isfinite(q) ? fma(r, fma(-s, q, a), q) : q;
}

// The row's loss and stats from the merged state (one thread per row).
template <typename A>
__device__ __forceinline__ void write_row(const RowState<A>& st, const SparseScalars<A>& k,
                                          A* loss, A* stats) {
  if (st.kept == A(0)) {  // all padding: a dead row
    *loss = A(0);
#pragma unroll
    for (int c = 0; c < sparse_kd_loss_stats::kCols; ++c) stats[c] = A(0);
    return;
  }
  const A lse_z = st.z.lse();
  const A lse_t = st.t.lse();
  A soft, mass;
  if (k.renormalize) {
    // a/s - lse_t + lse_z, the lse difference as (max difference) +
    // (log-sum difference) so that large lse values are not rounded before
    // they cancel. All kept l = -inf gives NaN, as the reference's softmax
    // over them does.
    // s_t = 0 (every kept l is -inf) leaves the quotient undefined: NaN.
    soft = st.t.s > A(0) ? div_by_sum(st.t.a, st.t.s) + (st.z.m - st.t.m) +
                               (device::acc_log(st.z.s) - device::acc_log(st.t.s))
                         : std::numeric_limits<A>::quiet_NaN();
    mass = st.t.s > A(0) ? A(1) : std::numeric_limits<A>::quiet_NaN();
  } else {
    // p_k = exp(l_k): sum p (l - z/T + lse_z) = mass (a/s + lse_z).
    mass = device::acc_exp(lse_t);
    soft = xmul(mass, div_by_sum(st.t.a, st.t.s) + lse_z);
  }
  *loss = k.soft_scale * soft;
  stats[sparse_kd_loss_stats::kLseStudent] = lse_z;
  stats[sparse_kd_loss_stats::kTeacherLogNormalizer] = k.renormalize ? lse_t : A(0);
  stats[sparse_kd_loss_stats::kTeacherMass] = mass;
  stats[sparse_kd_loss_stats::kDenseCoef] = mass;
  stats[sparse_kd_loss_stats::kTailLogRatio] = device::neg_inf<A>();
  stats[sparse_kd_loss_stats::kDivergence] = A(0);
}

// A tail row's loss and stats from its merged second-pass sums (one thread
// per row); log_norm and mass are the teacher's over the K + 1 buckets.
template <typename A>
__device__ __forceinline__ void write_tail_row(BucketSums<A> b, bool every_class_kept, A lse_z,
                                               A log_norm, A mass, A lambda,
                                               const SparseScalars<A>& k, A* loss, A* stats) {
  // The student's tail, log(1 - sum_k Q_k); -inf once the sum rounds to 1, and
  // when every class is kept (no tail class: 1 - sum is rounding only, and
  // against a teacher tail of 0 it would make reverse KL infinite). log(1 - s)
  // rather than log1p(-s), as in log_mix: one log body less in the fp64
  // forward; for s below eps they differ by at most eps absolutely, inside the
  // bound the terms are held to (docs/math.md §4.1).
  const A lq_tail = b.kept_q < A(1) && !every_class_kept ? device::acc_log(A(1) - b.kept_q)
                                                          : device::neg_inf<A>();
  const A lp_tail = lambda - log_norm;
  add_bucket(lp_tail, lq_tail, k, b.d, b.ds);
  const bool jsd = k.divergence == Divergence::JSD;
  const A dval = jsd ? b.ds : b.d;
  *loss = k.soft_scale * (jsd ? k.beta * b.d + (A(1) - k.beta) * b.ds : b.d);
  stats[sparse_kd_loss_stats::kLseStudent] = lse_z;
  stats[sparse_kd_loss_stats::kTeacherLogNormalizer] = log_norm;
  stats[sparse_kd_loss_stats::kTeacherMass] = mass;
  if (k.divergence == Divergence::ForwardKL) {
    // Tail class j: q_j (mass - P_tail / Q_tail) = mass q_j - exp(log q_j + rho).
    stats[sparse_kd_loss_stats::kDivergence] = A(0);
    stats[sparse_kd_loss_stats::kDenseCoef] = mass;
    stats[sparse_kd_loss_stats::kTailLogRatio] =
        device::acc_exp(lp_tail) == A(0) ? device::neg_inf<A>() : lp_tail - lq_tail;
  } else {
    // Tail class j: q_j (G_tail - Gbar); with Q_tail = 0 the tail classes
    // carry no mass and get 0.
    stats[sparse_kd_loss_stats::kDivergence] = dval;
    stats[sparse_kd_loss_stats::kDenseCoef] =
        lq_tail == device::neg_inf<A>() ? A(0) : bucket_bracket(lp_tail, lq_tail, dval, k);
    stats[sparse_kd_loss_stats::kTailLogRatio] = device::neg_inf<A>();
  }
}

// At least 3 resident blocks (<= 85 registers): without the bound ptxas held
// the fp64 forward, whose tail pass inlines several fp64 exp/log bodies, to
// 64 registers and spilled 160-420 B; at 3 blocks it needs 76-78, no spill,
// and the fp32 forwards (<= 48) are unaffected.
template <typename S, typename L, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads, 3)
    sparse_kd_loss_forward_kernel(const ForwardArgs<S, L, A> args) {
  constexpr int kVec = 16 / sizeof(S);
  __shared__ RowState<A> state_smem[kBlockThreads / kWarpSize];
  __shared__ BucketSums<A> sums_smem[kBlockThreads / kWarpSize];
  const SparseScalars<A>& k = args.k;
  const int lane = threadIdx.x % kRowThreads;

  for (int64_t row = first_row<kBlockThreads, kRowThreads>(); row < k.rows;
       row += row_stride<kBlockThreads, kRowThreads>()) {
    A* stats = args.stats + row * sparse_kd_loss_stats::kCols;
    if (k.has_labels && args.labels[row] == k.ignore_index) {
      if (lane == 0) {
        args.loss[row] = A(0);
#pragma unroll
        for (int c = 0; c < sparse_kd_loss_stats::kCols; ++c) stats[c] = A(0);
      }
      continue;
    }
    const int64_t row_start = row * k.z_stride;
    const S* z = args.student + row_start;
    const int64_t* index = args.index + row * k.k;
    const L* logprobs = args.logprobs + row * k.k;

    RowState<A> st{OnlineLSE<A>::empty(), OnlineLSE<A>::empty(), A(0)};
    for (int64_t e = lane; e < k.k; e += kRowThreads) {
      const int64_t j = kept_class(index, e, row, k, args.errors);
      if (j < 0) continue;  // padding
      if (k.check_duplicates) {
        for (int64_t f = 0; f < e; ++f) {
          if (index[f] == j) {
            device::record_input_error(args.errors, InputError::kDuplicateIndex, row, e, j, k.cols);
            break;
          }
        }
      }
      st.kept += A(1);
      const A l[1] = {static_cast<A>(logprobs[e])};
      const A d[1] = {l[0] - static_cast<A>(z[j]) * k.inv_t};
      st.t.add_weighted(l, d);
    }
    for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A zs[N];
      load_pack<N>(z + col, zs);
#pragma unroll
      for (int i = 0; i < N; ++i) zs[i] *= k.inv_t;
      st.z.add(zs);
    });
    st = group_allreduce<kRowThreads>(st, state_smem);
    if (!k.has_tail) {
      if (lane == 0) write_row(st, k, args.loss + row, stats);
      continue;
    }
    if (st.kept == A(0)) {  // all padding: a dead row (uniform over the group)
      if (lane == 0) write_row(st, k, args.loss + row, stats);
      continue;
    }
    // Every lane holds the same merged state and adds the same tail: the same
    // normalizer on every lane.
    const A lambda = static_cast<A>(args.tail[row]);
    const A lam[1] = {lambda};
    st.t.add(lam);
    const A lse_z = st.z.lse();
    const A log_norm = k.renormalize ? st.t.lse() : A(0);
    // All K + 1 buckets at -inf leave a renormalized row undefined: NaN.
    const A mass = k.renormalize
                       ? (st.t.s > A(0) ? A(1) : std::numeric_limits<A>::quiet_NaN())
                       : device::acc_exp(st.t.lse());
    BucketSums<A> b{A(0), A(0), A(0)};
    for (int64_t e = lane; e < k.k; e += kRowThreads) {
      const int64_t j = kept_class(index, e, row, k, args.errors);
      if (j < 0) continue;
      const A lq = static_cast<A>(z[j]) * k.inv_t - lse_z;
      const A lp = static_cast<A>(logprobs[e]) - log_norm;
      b.kept_q += device::acc_exp(lq);
      add_bucket(lp, lq, k, b.d, b.ds);
    }
    b = group_allreduce<kRowThreads>(b, sums_smem);
    if (lane == 0) {
      write_tail_row(b, st.kept == static_cast<A>(k.cols), lse_z, log_norm, mass, lambda, k,
                     args.loss + row, stats);
    }
  }
}

template <typename S, typename L, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    sparse_kd_loss_backward_kernel(const BackwardArgs<S, L, A> args) {
  constexpr int kVec = 16 / sizeof(S);
  const SparseScalars<A>& k = args.k;
  const int lane = threadIdx.x % kRowThreads;

  for (int64_t row = first_row<kBlockThreads, kRowThreads>(); row < k.rows;
       row += row_stride<kBlockThreads, kRowThreads>()) {
    // dz's row start; z's is at the same phase of a pack when k.aligned.
    const int64_t row_start = row * k.cols;
    const S* z = args.student + row * k.z_stride;
    S* dz = args.grad_student + row_start;
    const A* stats = args.stats + row * sparse_kd_loss_stats::kCols;
    const A mass = stats[sparse_kd_loss_stats::kTeacherMass];

    if ((k.has_labels && args.labels[row] == k.ignore_index) || mass == A(0)) {
      for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        const A zero[N] = {};
        store_pack<N>(dz + col, zero);
      });
      continue;
    }

    const A lse_z = stats[sparse_kd_loss_stats::kLseStudent];
    const A log_norm = stats[sparse_kd_loss_stats::kTeacherLogNormalizer];
    const A rho = stats[sparse_kd_loss_stats::kTailLogRatio];
    const A dval = stats[sparse_kd_loss_stats::kDivergence];
    const A c = args.grad_loss[row] * k.soft_grad_scale;
    const A cg = c * stats[sparse_kd_loss_stats::kDenseCoef];
    // Forward KL with a tail: the tail classes also lose P_tail q_j / Q_tail.
    const bool tail_ratio = rho != device::neg_inf<A>();
    const A lse_rho = lse_z - rho;
    for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A g[N];
      load_pack<N>(z + col, g);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A x = g[i] * k.inv_t;
        g[i] = cg * device::acc_exp(x - lse_z);
        if (tail_ratio) g[i] -= c * device::acc_exp(x - lse_rho);
      }
      store_pack<N>(dz + col, g);
    });
    // The dense writes above must land before the kept classes are rewritten.
    group_sync<kRowThreads>();
    const int64_t* index = args.index + row * k.k;
    const L* logprobs = args.logprobs + row * k.k;
    for (int64_t e = lane; e < k.k; e += kRowThreads) {
      const int64_t j = kept_class(index, e, row, k, args.errors);
      if (j < 0) continue;
      const A lp = static_cast<A>(logprobs[e]) - log_norm;
      const A lq = static_cast<A>(z[j]) * k.inv_t - lse_z;
      dz[j] = static_cast<S>(c * bucket_grad(lp, lq, mass, dval, k));
    }
  }
}

// ---------------------------------------------------------------- host side

// The student as the kernels read it: rows in place whatever their stride,
// columns at unit stride (copied otherwise).
at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

template <typename A>
SparseScalars<A> make_scalars(const SparseKDLossParams& p, int64_t z_stride, bool aligned) {
  SparseScalars<A> k;
  k.rows = p.rows;
  k.cols = static_cast<int>(p.cols);
  k.z_stride = z_stride;
  k.k = p.k;
  k.ignore_index = p.ignore_index;
  k.has_labels = p.has_labels;
  k.renormalize = p.renormalize;
  k.check_duplicates = false;
  k.aligned = aligned;
  k.has_tail = p.has_tail;
  k.divergence = p.divergence;
  k.beta = static_cast<A>(p.beta);
  k.log_beta = static_cast<A>(std::log(p.beta));
  k.log_1m_beta = static_cast<A>(std::log1p(-p.beta));
  k.inv_t = static_cast<A>(1.0 / p.temperature);
  k.soft_scale = static_cast<A>(p.soft_scale);
  k.soft_grad_scale = static_cast<A>(p.soft_scale / p.temperature);
  return k;
}

template <typename S, typename L>
void launch_forward(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& lp,
                    const at::Tensor& tail, const at::Tensor& labels, at::Tensor& loss,
                    at::Tensor& stats,
                    bool check_duplicates, int64_t* errors, const SparseKDLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = 16 / sizeof(S);
  ForwardArgs<S, L, A> args;
  args.student = z.data_ptr<S>();
  args.index = idx.data_ptr<int64_t>();
  args.logprobs = lp.data_ptr<L>();
  args.tail = p.has_tail ? tail.data_ptr<L>() : nullptr;
  args.labels = p.has_labels ? labels.data_ptr<int64_t>() : nullptr;
  args.loss = loss.data_ptr<A>();
  args.stats = stats.data_ptr<A>();
  args.errors = errors;
  args.k = make_scalars<A>(p, z.stride(0), pack_aligned<kVec>(args.student));
  args.k.check_duplicates = check_duplicates;
  launch::launch_row_groups(
      p.cols <= kWarpRowMaxCols, p.rows, sparse_kd_loss_forward_kernel<S, L, A, kWarpSize>,
      sparse_kd_loss_forward_kernel<S, L, A, kBlockThreads>, args,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename L>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& idx,
                     const at::Tensor& lp, const at::Tensor& labels, const at::Tensor& stats,
                     at::Tensor& grad_z, int64_t* errors, const SparseKDLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = 16 / sizeof(S);
  BackwardArgs<S, L, A> args;
  args.grad_loss = grad_loss.data_ptr<A>();
  args.student = z.data_ptr<S>();
  args.index = idx.data_ptr<int64_t>();
  args.logprobs = lp.data_ptr<L>();
  args.labels = p.has_labels ? labels.data_ptr<int64_t>() : nullptr;
  args.stats = stats.data_ptr<A>();
  args.grad_student = grad_z.data_ptr<S>();
  args.errors = errors;
  const bool same_phase = (z.stride(0) - p.cols) % kVec == 0;
  args.k = make_scalars<A>(p, z.stride(0), pack_aligned<kVec>(args.student) &&
                                               pack_aligned<kVec>(args.grad_student) && same_phase);
  launch::launch_row_groups(
      p.cols <= kWarpRowMaxCols, p.rows, sparse_kd_loss_backward_kernel<S, L, A, kWarpSize>,
      sparse_kd_loss_backward_kernel<S, L, A, kBlockThreads>, args,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_forward_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2,
    bool check_duplicates,
    const std::optional<at::Tensor>& teacher_tail_logprob,
    c10::string_view divergence,
    double beta) {
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2, teacher_tail_logprob, divergence, beta);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const auto acc_options = student_logits.options().dtype(acc_scalar_type(student_logits));
  at::Tensor loss = at::empty({p.rows}, acc_options);
  at::Tensor stats = at::empty({p.rows, sparse_kd_loss_stats::kCols}, acc_options);
  if (p.rows == 0) return {loss, stats};

  const at::Tensor z = unit_stride_rows(student_logits);
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const at::Tensor y = p.has_labels ? labels->contiguous() : at::Tensor();
  const at::Tensor tail = p.has_tail ? teacher_tail_logprob->contiguous() : at::Tensor();
  dispatch_input_types(z, "student_logits", lp, "teacher_logprobs",
                       [&]<typename S, typename L>() {
    launch_forward<S, L>(z, idx, lp, tail, y, loss, stats, check_duplicates, errors, p);
  });
  return {loss, stats};
}

at::Tensor sparse_kd_loss_backward_cuda(
    const at::Tensor& grad_loss,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    const at::Tensor& stats,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2,
    const std::optional<at::Tensor>& teacher_tail_logprob,
    c10::string_view divergence,
    double beta) {
  // The backward reads the tail only through the forward's stats.
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2, teacher_tail_logprob, divergence, beta);
  check_sparse_kd_loss_backward_args(grad_loss, stats, student_logits, p);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor grad_z = at::empty({p.rows, p.cols}, student_logits.options());
  if (p.rows == 0) return grad_z;

  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor z = unit_stride_rows(student_logits);
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const at::Tensor y = p.has_labels ? labels->contiguous() : at::Tensor();
  const at::Tensor s = stats.contiguous();
  dispatch_input_types(z, "student_logits", lp, "teacher_logprobs",
                       [&]<typename S, typename L>() {
    launch_backward<S, L>(g, z, idx, lp, y, s, grad_z, errors, p);
  });
  return grad_z;
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("sparse_kd_loss_forward", &distillkit::sparse_kd_loss_forward_cuda);
  m.impl("sparse_kd_loss_backward", &distillkit::sparse_kd_loss_backward_cuda);
}
