// CUDA kernels for kd_loss (docs/math.md §1); the math is in kd_loss.h, the
// stats layout in stats_layout.h.
//
// Mapping: one row per thread group, a warp for C <= kWarpRowMaxCols and the
// whole block otherwise, so a row's reductions never leave the block (no
// atomics; every loss is written once, deterministic).
//
// Forward: one streaming pass over z and u keeps, per thread, online
// log-sum-exp states of z/T and u/T (and of z for the hard term when T != 1),
// rescaled when the running max grows; KL(p||q) = sum p (u/T - z/T) - lse(u/T)
// + lse(z/T) rides along as a weighted sum under the same online weights.
// JSD needs lse(z/T) and lse(u/T) before log m = log(beta p + (1 - beta) q)
// exists, so it reads the row a second time. No tile of a row is held in
// registers beyond one 16-byte pack per tensor.
//
// Backward recomputes p and q from the saved per-row stats (no N x C buffer
// kept from the forward) and writes the gradient in one pass: it reads z and
// u and writes dz (and du when asked), with no reductions (a row with p ~ q
// reads the precise log-ratio offset from the stats too).
//
// Forward-grad runs the forward and then, on the same row group, the
// backward's pass with the stats still in registers and the row just read
// (in L2 for a block row of C = 32k: 128 KB of fp32 per tensor): the logits
// come from memory once per training step. The gradient is scaled by
// grad_scale (or 1) in the kernel.
//
// Logit rows may have any row stride (the class dimension contiguous); the
// outputs are contiguous.
//
// Labels are checked where they are read: one neither in [0, C) nor
// ignore_index is recorded (device_errors.cuh) and its row's loss is NaN; no
// label is dereferenced unchecked, and the host never reads one.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "kd_loss.h"
#include "launch.cuh"
#include "row_loss.h"
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
using device::Pack;
using device::pack_width;
using device::row_stride;
using device::store_pack;
using device::xmul;
using launch::kBlockThreads;
using launch::kWarpRowMaxCols;
using launch::pack_aligned;

// Per-launch scalars, resolved on the host in double and rounded once.
template <typename A>
struct KDScalars {
  int64_t rows;
  int cols;
  int64_t ignore_index;
  Divergence divergence;
  bool has_labels;
  bool hard;
  bool unit_t;   // T == 1: z/T is z, so lse(z) = lse(z/T) and softmax(z) = q
  bool aligned;  // every tensor's rows start at the same pack phase, bases aligned
  A inv_t;
  A beta;
  A one_minus_beta;
  A log_beta;          // JSD only: the mixture weights in log space
  A log_one_minus_beta;
  A soft_scale;        // (1 - hard_weight) * (T^2 or 1)
  A soft_grad_scale;   // soft_scale / T: d(z/T)/dz folded in
  A hard_weight;
};

// One argument block for the three kernels; each reads the fields of its
// pass. Logit rows may be strided (the class dimension is contiguous); the
// outputs are contiguous.
template <typename S, typename U, typename A>
struct Args {
  const S* student;
  const U* teacher;
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  const int64_t* labels;  // nullptr without labels
  A* loss;                // (N,): forward, forward_grad
  A* stats;               // (N, kd_loss_stats::kCols): written by the forwards
  const A* saved_stats;   // (N, kd_loss_stats::kCols): read by the backward
  // The gradient's per-row factor g: grad_loss (backward, stride 1) or
  // grad_scale (forward_grad, stride 1 or 0 for a 0-d scale; nullptr: g = 1).
  const A* row_scale;
  int64_t row_scale_stride;
  S* grad_student;        // backward, forward_grad
  U* grad_teacher;        // nullptr unless the teacher gradient is wanted
  int64_t* errors;        // the input error record
  KDScalars<A> k;
};

// Per-thread forward state: online lse of z/T, u/T and z. For forward KL,
// u.a accumulates sum exp(u/T - m) (u/T - z/T); for reverse KL, z.a
// accumulates sum exp(z/T - m) (z/T - u/T).
template <typename A>
struct RowState {
  OnlineLSE<A> z;
  OnlineLSE<A> u;
  OnlineLSE<A> z1;
};

template <typename A>
__device__ __forceinline__ RowState<A> merge(const RowState<A>& x, const RowState<A>& y) {
  return {device::merge(x.z, y.z), device::merge(x.u, y.u), device::merge(x.z1, y.z1)};
}

template <typename A>
__device__ __forceinline__ RowState<A> shfl_xor(const RowState<A>& v, int mask) {
  return {device::shfl_xor(v.z, mask), device::shfl_xor(v.u, mask), device::shfl_xor(v.z1, mask)};
}

// JSD second pass: sum p (log p - log m) and sum q (log q - log m).
template <typename A>
struct JsdSums {
  A teacher;
  A student;
};

template <typename A>
__device__ __forceinline__ JsdSums<A> merge(const JsdSums<A>& x, const JsdSums<A>& y) {
  return {x.teacher + y.teacher, x.student + y.student};
}

template <typename A>
__device__ __forceinline__ JsdSums<A> shfl_xor(const JsdSums<A>& v, int mask) {
  return {device::shfl_xor(v.teacher, mask), device::shfl_xor(v.student, mask)};
}

// ------------------------------------- the cancellation-free passes (kd_loss.h)

// w(e) = 1 + (e - 1) e^e by its series, for |e| <= 1/2 (callers take
// b + (e - 1) b e^e beyond, with b e^e formed as one exp).
template <typename A>
__device__ __forceinline__ A ratio_weight(A e) {
  constexpr int kTerms = std::is_same_v<A, double> ? kRatioWeightTerms64 : kRatioWeightTerms32;
  constexpr RatioWeightSeries<kTerms> coef;
  A series = A(0);
#pragma unroll
  for (int i = kTerms - 1; i >= 0; --i) series = series * e + static_cast<A>(coef.c[i]);
  return series * e * e;
}

// log q - log m = -log(1 - beta + beta e^rp) and log p - log m =
// -log(beta + (1 - beta) e^-rp) from rp = log p - log q: log1p of a small
// expm1 near rp = 0, a logaddexp of the mixture weights (no overflow) beyond.
template <typename A>
__device__ __forceinline__ A student_mixture_log(A rp, const KDScalars<A>& k) {
  return device::acc_abs(rp) <= A(0.5)
             ? -device::acc_log1p(k.beta * device::acc_expm1(rp))
             : -device::log_add_exp(k.log_one_minus_beta, k.log_beta + rp);
}

template <typename A>
__device__ __forceinline__ A teacher_mixture_log(A rp, const KDScalars<A>& k) {
  return device::acc_abs(rp) <= A(0.5)
             ? -device::acc_log1p(k.one_minus_beta * device::acc_expm1(-rp))
             : -device::log_add_exp(k.log_beta, k.log_one_minus_beta - rp);
}

// phi(y) = y - log1p(y), by its atanh series for |y| <= 1/2.
template <typename A>
__device__ __forceinline__ A log1p_gap(A y) {
  constexpr int kTerms = std::is_same_v<A, double> ? kLog1pGapTerms64 : kLog1pGapTerms32;
  if (device::acc_abs(y) > A(0.5)) return y - device::acc_log1p(y);
  const A s = y / (A(2) + y), s2 = s * s;
  A series = A(0);
#pragma unroll
  for (int j = kTerms - 1; j >= 0; --j) series = series * s2 + A(1) / A(2 * j + 3);
  return y * s - A(2) * s * s2 * series;
}

template <typename A>
__device__ __forceinline__ bool needs_stable_pass(A soft, A magnitude) {
  return device::acc_isfinite(soft) && device::acc_isfinite(magnitude) &&
         !(soft > magnitude * static_cast<A>(kStableRatio));
}

// Q, Q X and Q W of kd_loss.h over one row.
template <typename A>
struct RatioSums {
  A q;
  A x;
  A w;
};

template <typename A>
__device__ __forceinline__ RatioSums<A> merge(const RatioSums<A>& a, const RatioSums<A>& b) {
  return {a.q + b.q, a.x + b.x, a.w + b.w};
}

template <typename A>
__device__ __forceinline__ RatioSums<A> shfl_xor(const RatioSums<A>& v, int mask) {
  return {device::shfl_xor(v.q, mask), device::shfl_xor(v.x, mask), device::shfl_xor(v.w, mask)};
}

// Walks a row as for_each_pack does, calling f(n, zs, us) with z/T and u/T of
// the n columns (n a std::integral_constant, zs and us arrays of n).
template <int kVec, int kRowThreads, typename S, typename U, typename A, typename F>
__device__ __forceinline__ void for_each_scaled_pack(const S* z, const U* u, int64_t row_start,
                                                     const KDScalars<A>& k, int lane, F&& f) {
  for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
    constexpr int N = decltype(n)::value;
    A zs[N], us[N];
    load_pack<N>(z + col, zs);
    load_pack<N>(u + col, us);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      zs[i] *= k.inv_t;
      us[i] *= k.inv_t;
    }
    f(n, zs, us);
  });
}

// X and W (normalized by Q) with the student (student_base) or the teacher as
// the base. Every thread of the row group calls it.
template <int kVec, int kRowThreads, typename S, typename U, typename A>
__device__ __forceinline__ RatioSums<A> ratio_sums(const S* z, const U* u, int64_t row_start,
                                                   const KDScalars<A>& k, int lane,
                                                   bool student_base, A lse_base, A c,
                                                   RatioSums<A>* smem) {
  RatioSums<A> acc{A(0), A(0), A(0)};
  for_each_scaled_pack<kVec, kRowThreads>(z, u, row_start, k, lane, [&](auto n, const auto& zs,
                                                                        const auto& us) {
#pragma unroll
    for (int i = 0; i < decltype(n)::value; ++i) {
      const A base = student_base ? zs[i] : us[i], other = student_base ? us[i] : zs[i];
      const A b = device::acc_exp(base - lse_base);
      const A e = (other - base) - c;
      // b e^e as one exp: finite where e is large, and not 0 where b underflowed
      // but the other distribution has mass (0 * inf).
      const A be = device::acc_exp(other - c - lse_base);
      acc.q += b;
      if (b == A(0) && be == A(0)) continue;
      if (device::acc_abs(e) <= A(0.5)) {
        acc.x += b * device::acc_expm1(e);
        acc.w += b * ratio_weight(e);
      } else {
        acc.x += be - b;
        acc.w += b + xmul(be, e - A(1));
      }
    }
  });
  acc = group_allreduce<kRowThreads>(acc, smem);
  return {acc.q, acc.x / acc.q, acc.w / acc.q};
}

template <typename A>
__device__ __forceinline__ A kl_from(const RatioSums<A>& r) {
  return r.w / (A(1) + r.x) + (r.x / (A(1) + r.x) - device::acc_log1p(r.x));
}

// log p - log q = (u/T - z/T) - offset to full precision: offset = c +
// log1p(X) over the base q, c = lse(u/T) - lse(z/T) as rounded. JSD's
// cancellation-free pass forms it; the forward saves it (kLogRatioOffset).
template <int kVec, int kRowThreads, typename S, typename U, typename A>
__device__ __forceinline__ A log_ratio_offset(const S* z, const U* u, int64_t row_start,
                                              const KDScalars<A>& k, int lane, A lse_z, A lse_u,
                                              RatioSums<A>* smem) {
  const A c = lse_u - lse_z;
  return c + device::acc_log1p(
                 ratio_sums<kVec, kRowThreads>(z, u, row_start, k, lane, true, lse_z, c, smem).x);
}

// What a row's gradient needs: the saved stats, from the forward just run
// (forward_grad, in registers) or from memory (backward).
template <typename A>
struct RowStats {
  A lse_z;
  A lse_u;
  A lse_z1;
  A d_student;
  A d_teacher;
  A log_ratio_offset;  // kLogRatioOffset
};

// The static shared memory of the row reductions (a slot per warp).
template <typename A>
struct RowSmem {
  RowState<A> state[kBlockThreads / kWarpSize];
  JsdSums<A> sums[kBlockThreads / kWarpSize];
  RatioSums<A> ratio[kBlockThreads / kWarpSize];
};

// The forward of one row (label valid or absent): its stats, the same on every
// thread of the group, and its loss in `loss`. Every thread of the group calls it.
template <int kVec, int kRowThreads, typename S, typename U, typename A>
__device__ __forceinline__ RowStats<A> forward_row(const S* z, const U* u, int64_t phase,
                                                   int64_t label, const KDScalars<A>& k,
                                                   int lane, RowSmem<A>& smem, A& loss) {
  const bool track_z1 = k.hard && !k.unit_t;
  RowState<A> st{OnlineLSE<A>::empty(), OnlineLSE<A>::empty(), OnlineLSE<A>::empty()};
  for_each_pack<kVec>(phase, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
    constexpr int N = decltype(n)::value;
    A zr[N], zs[N], us[N], d[N];
    load_pack<N>(z + col, zr);
    load_pack<N>(u + col, us);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      zs[i] = zr[i] * k.inv_t;
      us[i] *= k.inv_t;
    }
    switch (k.divergence) {
      case Divergence::ForwardKL:
#pragma unroll
        for (int i = 0; i < N; ++i) d[i] = us[i] - zs[i];
        st.u.add_weighted(us, d);
        st.z.add(zs);
        break;
      case Divergence::ReverseKL:
#pragma unroll
        for (int i = 0; i < N; ++i) d[i] = zs[i] - us[i];
        st.z.add_weighted(zs, d);
        st.u.add(us);
        break;
      case Divergence::JSD:
        st.z.add(zs);
        st.u.add(us);
        break;
    }
    if (track_z1) st.z1.add(zr);
  });
  st = group_allreduce<kRowThreads>(st, smem.state);

  const A lse_z = st.z.lse();
  const A lse_u = st.u.lse();
  A d_student = A(0);
  A d_teacher = A(0);
  A soft;
  // KL = a/s - lse_from + lse_to, with the lse difference taken as
  // (max difference) + (log-sum difference) so that two large lse values
  // are not rounded before they cancel.
  switch (k.divergence) {
    case Divergence::ForwardKL:
      d_teacher = st.u.a / st.u.s + (st.z.m - st.u.m) +
                  (device::acc_log(st.z.s) - device::acc_log(st.u.s));
      soft = d_teacher;
      break;
    case Divergence::ReverseKL:
      d_student = st.z.a / st.z.s + (st.u.m - st.z.m) +
                  (device::acc_log(st.u.s) - device::acc_log(st.z.s));
      soft = d_student;
      break;
    case Divergence::JSD: {
      JsdSums<A> sums{A(0), A(0)};
      for_each_pack<kVec>(phase, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        A zr[N], ur[N];
        load_pack<N>(z + col, zr);
        load_pack<N>(u + col, ur);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const A log_q = zr[i] * k.inv_t - lse_z;
          const A log_p = ur[i] * k.inv_t - lse_u;
          const A log_m = device::log_add_exp(log_p + k.log_beta, log_q + k.log_one_minus_beta);
          sums.teacher += xmul(device::acc_exp(log_p), log_p - log_m);
          sums.student += xmul(device::acc_exp(log_q), log_q - log_m);
        }
      });
      sums = group_allreduce<kRowThreads>(sums, smem.sums);
      d_teacher = sums.teacher;
      d_student = sums.student;
      soft = k.beta * d_teacher + k.one_minus_beta * d_student;
      break;
    }
  }
  // Rows where cancellation took the one-pass result's digits (kd_loss.h).
  // The decision is the same on every thread of the group (all-reduced values).
  // Their pass also gives lse(u/T) - lse(z/T) to full precision (c + log1p(X),
  // for any reference c), saved for the backward's cancellation-free pass; the
  // other rows keep the rounded difference, which the backward never reads (its
  // test on the final divergence takes that pass only on rows that took it here).
  const A lse_mag = device::acc_abs(lse_z) + device::acc_abs(lse_u);
  A offset = lse_u - lse_z;
  if (k.divergence == Divergence::ForwardKL &&
      needs_stable_pass(d_teacher, lse_mag + device::acc_abs(st.u.a / st.u.s))) {
    const A c = st.u.a / st.u.s;
    const RatioSums<A> r =
        ratio_sums<kVec, kRowThreads>(z, u, phase, k, lane, true, lse_z, c, smem.ratio);
    d_teacher = kl_from(r);
    offset = c + device::acc_log1p(r.x);
    soft = d_teacher;
  } else if (k.divergence == Divergence::ReverseKL &&
             needs_stable_pass(d_student, lse_mag + device::acc_abs(st.z.a / st.z.s))) {
    // Base p: lse(z/T) - lse(u/T) = c + log1p(X).
    const A c = st.z.a / st.z.s;
    const RatioSums<A> r =
        ratio_sums<kVec, kRowThreads>(z, u, phase, k, lane, false, lse_u, c, smem.ratio);
    d_student = kl_from(r);
    offset = -(c + device::acc_log1p(r.x));
    soft = d_student;
  } else if (k.divergence == Divergence::JSD &&
             needs_stable_pass(device::acc_min(d_teacher, d_student), lse_mag)) {
    offset = log_ratio_offset<kVec, kRowThreads>(z, u, phase, k, lane, lse_z, lse_u, smem.ratio);
    JsdSums<A> sums{A(0), A(0)};
    for_each_scaled_pack<kVec, kRowThreads>(z, u, phase, k, lane, [&](auto n, const auto& zs,
                                                                          const auto& us) {
#pragma unroll
      for (int i = 0; i < decltype(n)::value; ++i) {
        const A rp = (us[i] - zs[i]) - offset;
        const A p = device::acc_exp(us[i] - lse_u), q = device::acc_exp(zs[i] - lse_z);
        // Near rp = 0 the phi forms; beyond, p (log p - log m) + (1 - beta)(q - p),
        // which is p phi(...) without its expm1 overflowing.
        if (device::acc_abs(rp) <= A(0.5)) {
          sums.teacher += xmul(p, log1p_gap(k.one_minus_beta * device::acc_expm1(-rp)));
          sums.student += xmul(q, log1p_gap(k.beta * device::acc_expm1(rp)));
        } else {
          sums.teacher += xmul(p, teacher_mixture_log(rp, k)) + k.one_minus_beta * (q - p);
          sums.student += xmul(q, student_mixture_log(rp, k)) + k.beta * (p - q);
        }
      }
    });
    sums = group_allreduce<kRowThreads>(sums, smem.sums);
    d_teacher = sums.teacher;
    d_student = sums.student;
    soft = k.beta * d_teacher + k.one_minus_beta * d_student;
  }

  // lse(z) costs a third online stream, so it is tracked only when the hard
  // term needs it and T != 1; otherwise its column repeats lse(z/T), as the
  // CPU kernel does (the gradient never reads it then).
  const A lse_z1 = track_z1 ? st.z1.lse() : lse_z;
  loss = k.soft_scale * soft;
  if (k.hard) loss += k.hard_weight * (lse_z1 - static_cast<A>(z[label]));
  return {lse_z, lse_u, lse_z1, d_student, d_teacher, offset};
}

// dz (and du when wanted) of g * loss of one row from its stats, with no
// reductions. Every thread of the group calls it.
template <int kVec, int kRowThreads, typename S, typename U, typename A>
__device__ __forceinline__ void gradient_row(const S* z, const U* u, S* dz, U* du, int64_t phase,
                                             int64_t label, const RowStats<A>& st, A g,
                                             const KDScalars<A>& k, int lane) {
  const A c = g * k.soft_grad_scale;
  // JSD weights its two KL terms by 1 - beta (student) and beta (teacher).
  const bool jsd = k.divergence == Divergence::JSD;
  const A c_student = jsd ? c * k.one_minus_beta : c;
  const A c_teacher = jsd ? c * k.beta : c;
  const A h = g * k.hard_weight;
  // Where the divergence is tiny next to the lse values, q - p and the log
  // ratios cancel too: they come from rp = log p - log q to full precision,
  // rp = (u/T - z/T) - the saved offset (the forward's pass formed it; a caller
  // that builds the stats, vocab-parallel KD, gives the offset of the whole
  // row, which no pass over this row's columns could), q - p = -q expm1(rp).
  // Uniform over the row group.
  const A d_soft = k.divergence == Divergence::ForwardKL   ? st.d_teacher
                   : k.divergence == Divergence::ReverseKL ? st.d_student
                                                           : device::acc_min(st.d_teacher,
                                                                             st.d_student);
  const bool stable =
      needs_stable_pass(d_soft, device::acc_abs(st.lse_z) + device::acc_abs(st.lse_u));
  const A offset = stable ? st.log_ratio_offset : A(0);

  for_each_pack<kVec>(phase, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
    constexpr int N = decltype(n)::value;
    // The packs stay in their storage type and each element is converted where it
    // is used and rounded as soon as it is formed: a 16-bit pack keeps 8 registers
    // live instead of 32 fp32 values (register pressure of the block-row kernels).
    const Pack<S, N> zp = *reinterpret_cast<const Pack<S, N>*>(z + col);
    const Pack<U, N> up = *reinterpret_cast<const Pack<U, N>*>(u + col);
    Pack<S, N> gzp;
    Pack<U, N> gup;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A zr_i = static_cast<A>(zp.v[i]), ur_i = static_cast<A>(up.v[i]);
      A gz_i, gu_i;
      const A log_q = zr_i * k.inv_t - st.lse_z;
      const A log_p = ur_i * k.inv_t - st.lse_u;
      const A q = device::acc_exp(log_q);
      const A p = device::acc_exp(log_p);
      const A rp = (ur_i * k.inv_t - zr_i * k.inv_t) - offset;
      if (stable) {
        // p - q = q expm1(rp) near rp = 0, p - q itself beyond.
        const A p_minus_q = device::acc_abs(rp) <= A(0.5) ? xmul(q, device::acc_expm1(rp)) : p - q;
        switch (k.divergence) {
          case Divergence::ForwardKL:
            gz_i = -c * p_minus_q;
            gu_i = c * xmul(p, rp - st.d_teacher);
            break;
          case Divergence::ReverseKL:
            gz_i = c * xmul(q, -rp - st.d_student);
            gu_i = c * p_minus_q;
            break;
          case Divergence::JSD:
            gz_i = c_student * xmul(q, student_mixture_log(rp, k) - st.d_student);
            gu_i = c_teacher * xmul(p, teacher_mixture_log(rp, k) - st.d_teacher);
            break;
        }
      } else {
        switch (k.divergence) {
          case Divergence::ForwardKL:
            gz_i = c * (q - p);
            gu_i = c * xmul(p, log_p - log_q - st.d_teacher);
            break;
          case Divergence::ReverseKL:
            gz_i = c * xmul(q, log_q - log_p - st.d_student);
            gu_i = c * (p - q);
            break;
          case Divergence::JSD: {
            const A log_m = device::log_add_exp(log_p + k.log_beta, log_q + k.log_one_minus_beta);
            gz_i = c_student * xmul(q, log_q - log_m - st.d_student);
            gu_i = c_teacher * xmul(p, log_p - log_m - st.d_teacher);
            break;
          }
        }
      }
      if (k.hard) {
        const A q1 = k.unit_t ? q : device::acc_exp(zr_i - st.lse_z1);
        gz_i += h * (col + i == label ? q1 - A(1) : q1);
      }
      gzp.v[i] = static_cast<S>(gz_i);
      gup.v[i] = static_cast<U>(gu_i);
    }
    *reinterpret_cast<Pack<S, N>*>(dz + col) = gzp;
    if (du != nullptr) *reinterpret_cast<Pack<U, N>*>(du + col) = gup;
  });
}

enum class Pass { kForward, kBackward, kForwardGrad };

// The row loop of the three kernels. Labels are checked where they are read
// (by every pass: they may have changed since the forward): a bad one is
// recorded, its row's loss is NaN and its gradient zero; ignored rows have
// loss 0, zero stats (never read) and a zero gradient, and skip every pass.
template <Pass kPass, typename S, typename U, typename A, int kRowThreads>
__device__ __forceinline__ void kd_loss_rows(const Args<S, U, A>& args) {
  constexpr int kVec = pack_width<S, U>();
  constexpr bool kForward = kPass != Pass::kBackward;
  constexpr bool kGrad = kPass != Pass::kForward;
  __shared__ RowSmem<A> smem;
  const KDScalars<A>& k = args.k;
  const int lane = threadIdx.x % kRowThreads;

  for (int64_t row = first_row<kBlockThreads, kRowThreads>(); row < k.rows;
       row += row_stride<kBlockThreads, kRowThreads>()) {
    const S* z = args.student + row * args.student_row_stride;
    const U* u = args.teacher + row * args.teacher_row_stride;
    // The pack phase of the row in every tensor when k.aligned (row strides
    // congruent to cols modulo the pack): that of the contiguous outputs.
    const int64_t phase = row * k.cols;
    S* dz = kGrad ? args.grad_student + phase : nullptr;
    U* du = kGrad && args.grad_teacher != nullptr ? args.grad_teacher + phase : nullptr;
    A* stats = kForward ? args.stats + row * kd_loss_stats::kCols : nullptr;
    const int64_t label = k.has_labels ? args.labels[row] : 0;
    const bool ignored = k.has_labels && label == k.ignore_index;
    const bool bad_label = k.has_labels && !ignored && (label < 0 || label >= k.cols);

    if (ignored || bad_label) {
      if (lane == 0) {
        if (bad_label) {
          device::record_input_error(args.errors, InputError::kLabel, row, -1, label, k.cols,
                                     k.ignore_index);
        }
        if constexpr (kForward) {
          args.loss[row] = ignored ? A(0) : std::numeric_limits<A>::quiet_NaN();
#pragma unroll
          for (int c = 0; c < kd_loss_stats::kCols; ++c) stats[c] = A(0);
        }
      }
      if constexpr (kGrad) {
        for_each_pack<kVec>(phase, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
          constexpr int N = decltype(n)::value;
          const A zero[N] = {};
          store_pack<N>(dz + col, zero);
          if (du != nullptr) store_pack<N>(du + col, zero);
        });
      }
      continue;
    }

    RowStats<A> st;
    if constexpr (kForward) {
      A loss;
      st = forward_row<kVec, kRowThreads>(z, u, phase, label, k, lane, smem, loss);
      if (lane == 0) {
        args.loss[row] = loss;
        stats[kd_loss_stats::kLseStudent] = st.lse_z;
        stats[kd_loss_stats::kLseTeacher] = st.lse_u;
        stats[kd_loss_stats::kLseStudentT1] = st.lse_z1;
        stats[kd_loss_stats::kDStudent] = st.d_student;
        stats[kd_loss_stats::kDTeacher] = st.d_teacher;
        stats[kd_loss_stats::kLogRatioOffset] = st.log_ratio_offset;
      }
    } else {
      const A* saved = args.saved_stats + row * kd_loss_stats::kCols;
      st = {saved[kd_loss_stats::kLseStudent], saved[kd_loss_stats::kLseTeacher],
            saved[kd_loss_stats::kLseStudentT1], saved[kd_loss_stats::kDStudent],
            saved[kd_loss_stats::kDTeacher], saved[kd_loss_stats::kLogRatioOffset]};
    }
    if constexpr (kGrad) {
      const A g = args.row_scale == nullptr ? A(1) : args.row_scale[row * args.row_scale_stride];
      gradient_row<kVec, kRowThreads>(z, u, dz, du, phase, label, st, g, k, lane);
    }
  }
}

template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads) kd_loss_forward_kernel(const Args<S, U, A> args) {
  kd_loss_rows<Pass::kForward, S, U, A, kRowThreads>(args);
}

// The gradient kernels declare that one resident block per SM is enough:
// without it ptxas capped them at an occupancy step (64, 80 or 128 registers)
// and spilled (the 16-bit and fp64 rows; benchmarks/results/
// cuda_resources_sm90_kd_loss.md has what they use instead).
template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    kd_loss_backward_kernel(const Args<S, U, A> args) {
  kd_loss_rows<Pass::kBackward, S, U, A, kRowThreads>(args);
}

template <typename S, typename U, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    kd_loss_forward_grad_kernel(const Args<S, U, A> args) {
  kd_loss_rows<Pass::kForwardGrad, S, U, A, kRowThreads>(args);
}

// ---------------------------------------------------------------- host side

template <typename A>
KDScalars<A> make_scalars(const KDLossParams& p, bool aligned) {
  KDScalars<A> k;
  k.rows = p.rows;
  k.cols = static_cast<int>(p.cols);
  k.ignore_index = p.ignore_index;
  k.divergence = p.divergence;
  k.has_labels = p.has_labels;
  k.hard = p.hard;
  k.unit_t = p.temperature == 1.0;
  k.aligned = aligned;
  k.inv_t = static_cast<A>(1.0 / p.temperature);
  k.beta = static_cast<A>(p.beta);
  k.one_minus_beta = static_cast<A>(1.0 - p.beta);
  // Read only for JSD, where 0 < beta < 1 keeps both finite.
  k.log_beta = static_cast<A>(std::log(p.beta));
  k.log_one_minus_beta = static_cast<A>(std::log1p(-p.beta));
  k.soft_scale = static_cast<A>(p.soft_scale);
  k.soft_grad_scale = static_cast<A>(p.soft_scale / p.temperature);
  k.hard_weight = static_cast<A>(p.hard_weight);
  return k;
}

// Only the class dimension must be contiguous: row strides are read in place
// (a slice such as logits[:, :V] is not copied), as on the CPU.
at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

// The tensors of one launch; undefined ones are not taken.
struct LaunchTensors {
  at::Tensor z, u, labels;
  at::Tensor loss, stats;    // forwards' outputs
  at::Tensor saved_stats;    // backward
  at::Tensor row_scale;      // grad_loss (backward) or grad_scale (forward_grad)
  at::Tensor grad_z, grad_u;
};

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}


template <typename S, typename U>
void launch_kernel(Pass pass, const LaunchTensors& t, int64_t* errors, const KDLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = pack_width<S, U>();
  Args<S, U, A> args;
  args.student = t.z.data_ptr<S>();
  args.teacher = t.u.data_ptr<U>();
  args.student_row_stride = t.z.stride(0);
  args.teacher_row_stride = t.u.stride(0);
  args.labels = p.has_labels ? t.labels.data_ptr<int64_t>() : nullptr;
  args.loss = ptr_or_null<A>(t.loss);
  args.stats = ptr_or_null<A>(t.stats);
  args.saved_stats = ptr_or_null<A>(t.saved_stats);
  args.row_scale = ptr_or_null<A>(t.row_scale);
  args.row_scale_stride = t.row_scale.defined() && t.row_scale.dim() == 1 ? 1 : 0;
  args.grad_student = ptr_or_null<S>(t.grad_z);
  args.grad_teacher = ptr_or_null<U>(t.grad_u);
  args.errors = errors;
  // Packs are aligned in every tensor when the bases are and each row stride
  // keeps the phase of the contiguous outputs (stride = cols mod kVec);
  // otherwise every row goes scalar.
  const bool aligned = pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.teacher) &&
                       (args.grad_student == nullptr || pack_aligned<kVec>(args.grad_student)) &&
                       (args.grad_teacher == nullptr || pack_aligned<kVec>(args.grad_teacher)) &&
                       args.student_row_stride % kVec == p.cols % kVec &&
                       args.teacher_row_stride % kVec == p.cols % kVec;
  args.k = make_scalars<A>(p, aligned);
  const bool warp_rows = p.cols <= kWarpRowMaxCols;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (pass) {
    case Pass::kForward:
      launch::launch_row_groups(warp_rows, p.rows, kd_loss_forward_kernel<S, U, A, kWarpSize>,
                                kd_loss_forward_kernel<S, U, A, kBlockThreads>, args, stream);
      break;
    case Pass::kBackward:
      launch::launch_row_groups(warp_rows, p.rows, kd_loss_backward_kernel<S, U, A, kWarpSize>,
                                kd_loss_backward_kernel<S, U, A, kBlockThreads>, args, stream);
      break;
    case Pass::kForwardGrad:
      launch::launch_row_groups(warp_rows, p.rows,
                                kd_loss_forward_grad_kernel<S, U, A, kWarpSize>,
                                kd_loss_forward_grad_kernel<S, U, A, kBlockThreads>, args,
                                stream);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pass(Pass pass, const LaunchTensors& t, int64_t* errors, const KDLossParams& p) {
  dispatch_input_types(t.z, "student_logits", t.u, "teacher_logits",
                       [&]<typename S, typename U>() { launch_kernel<S, U>(pass, t, errors, p); });
}

// The inputs every pass reads: logits with a unit class stride, labels.
LaunchTensors inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                     const std::optional<at::Tensor>& labels, const KDLossParams& p) {
  LaunchTensors t;
  t.z = unit_stride_rows(student_logits);
  t.u = unit_stride_rows(teacher_logits);
  if (p.has_labels) t.labels = labels->contiguous();
  return t;
}

// The forwards' loss (N,) and stats, in the accumulation type.
std::pair<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& student_logits,
                                                  const KDLossParams& p) {
  const auto acc_options = student_logits.options().dtype(acc_scalar_type(student_logits));
  return {at::empty({p.rows}, acc_options),
          at::empty({p.rows, kd_loss_stats::kCols}, acc_options)};
}

// The contiguous gradients; the teacher's is an empty (0,) tensor unless wanted.
std::pair<at::Tensor, at::Tensor> gradient_outputs(const at::Tensor& student_logits,
                                                   const at::Tensor& teacher_logits,
                                                   const KDLossParams& p, bool teacher_grad) {
  return {at::empty({p.rows, p.cols}, student_logits.options()),
          teacher_grad ? at::empty({p.rows, p.cols}, teacher_logits.options())
                       : at::empty({0}, teacher_logits.options())};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    c10::string_view divergence,
    double beta,
    double hard_weight,
    int64_t ignore_index,
    bool scale_by_t2) {
  const KDLossParams p = check_kd_loss_args(
      student_logits, teacher_logits, labels, temperature, divergence, beta, hard_weight,
      ignore_index, scale_by_t2);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  auto [loss, stats] = forward_outputs(student_logits, p);
  if (p.rows == 0) return {loss, stats};

  LaunchTensors t = inputs(student_logits, teacher_logits, labels, p);
  t.loss = loss;
  t.stats = stats;
  launch_pass(Pass::kForward, t, errors, p);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cuda(
    const at::Tensor& grad_loss,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    const at::Tensor& stats,
    double temperature,
    c10::string_view divergence,
    double beta,
    double hard_weight,
    int64_t ignore_index,
    bool scale_by_t2,
    bool teacher_grad) {
  const KDLossParams p = check_kd_loss_args(
      student_logits, teacher_logits, labels, temperature, divergence, beta, hard_weight,
      ignore_index, scale_by_t2);
  check_kd_loss_backward_args(grad_loss, stats, student_logits, p);
  int64_t* const errors = device_error_record(student_logits);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  const c10::cuda::CUDAGuard guard(student_logits.device());
  auto [grad_z, grad_u] = gradient_outputs(student_logits, teacher_logits, p, teacher_grad);
  if (p.rows == 0) return {grad_z, grad_u};

  LaunchTensors t = inputs(student_logits, teacher_logits, labels, p);
  t.saved_stats = stats.contiguous();
  t.row_scale = grad_loss.contiguous();
  t.grad_z = grad_z;
  if (teacher_grad) t.grad_u = grad_u;
  launch_pass(Pass::kBackward, t, errors, p);
  return {grad_z, grad_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_grad_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& grad_scale,
    double temperature,
    c10::string_view divergence,
    double beta,
    double hard_weight,
    int64_t ignore_index,
    bool scale_by_t2,
    bool teacher_grad) {
  const KDLossParams p = check_kd_loss_args(
      student_logits, teacher_logits, labels, temperature, divergence, beta, hard_weight,
      ignore_index, scale_by_t2);
  check_kd_loss_grad_scale(grad_scale, student_logits, p.rows);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  auto [loss, stats] = forward_outputs(student_logits, p);
  auto [grad_z, grad_u] = gradient_outputs(student_logits, teacher_logits, p, teacher_grad);
  if (p.rows == 0) return {loss, stats, grad_z, grad_u};

  LaunchTensors t = inputs(student_logits, teacher_logits, labels, p);
  t.loss = loss;
  t.stats = stats;
  if (grad_scale.has_value()) t.row_scale = grad_scale->contiguous();
  t.grad_z = grad_z;
  if (teacher_grad) t.grad_u = grad_u;
  launch_pass(Pass::kForwardGrad, t, errors, p);
  return {loss, stats, grad_z, grad_u};
}

// g[i] * G[i, :]: one elementwise kernel (products in the accumulation type,
// rounded once to G's dtype on store); g stays on the device.
at::Tensor kd_loss_scale_grad_cuda(const at::Tensor& unit_grad, const at::Tensor& grad_rows) {
  check_kd_loss_scale_grad_args(unit_grad, grad_rows);
  const c10::cuda::CUDAGuard guard(unit_grad.device());
  at::Tensor out = at::empty({unit_grad.size(0), unit_grad.size(1)}, unit_grad.options());
  // (N, 1) or (1, 1): a dimensioned operand, so the products are formed in its
  // dtype, not in G's 16-bit one.
  at::mul_out(out, unit_grad, grad_rows.reshape({-1, 1}));
  return out;
}

// In place, as one elementwise kernel too; rows of factor 1 are multiplied
// all the same (skipping them would need the factors on the host).
void kd_loss_scale_grad__cuda(at::Tensor& grad, const at::Tensor& grad_rows) {
  check_kd_loss_scale_grad_in_place_args(grad, grad_rows);
  const c10::cuda::CUDAGuard guard(grad.device());
  grad.mul_(grad_rows.reshape({-1, 1}));
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("kd_loss_forward", &distillkit::kd_loss_forward_cuda);
  m.impl("kd_loss_backward", &distillkit::kd_loss_backward_cuda);
  m.impl("kd_loss_forward_grad", &distillkit::kd_loss_forward_grad_cuda);
  m.impl("kd_loss_scale_grad", &distillkit::kd_loss_scale_grad_cuda);
  m.impl("kd_loss_scale_grad_", &distillkit::kd_loss_scale_grad__cuda);
}
