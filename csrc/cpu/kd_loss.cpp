// CPU kernels of kd_loss (docs/math.md §1). Rows run in parallel; within a row the
// logits stream through fixed tiles converted to the accumulation type, so
// a row of any length (C = 256k included) costs two small L1 buffers:
//   forward:  one pass with an online max / sum-exp per row (JSD adds a
//             second pass for the elementwise log of the mixture),
//   backward: one pass that recomputes p and q from the saved row stats and
//             writes the gradient (recompute instead of storing an N x C
//             gradient in forward: fwd+bwd moves 5 units and needs no buffer),
//   forward_grad: the forward, then at once the backward's pass on the same
//             row while it is in cache: the logits are read from memory once
//             and no pass recomputes what the forward just had; KL rows keep
//             the forward's exponentials (RowExps), so the gradient pass
//             needs none (2 exps per element in all instead of 4).
// Every row is reduced by one thread in a fixed order, so results are the
// same bits run to run and for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "cpu/vec_tiles.h"
#include "cpu_value_checks.h"
#include "input_errors.h"
#include "kd_loss.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using namespace cpu;

template <typename acc_t>
struct Args {
  const void* student;
  const void* teacher;
  int64_t s_row_stride;
  int64_t t_row_stride;
  const int64_t* labels;  // nullptr without labels
  TileLoader<acc_t> load_s;
  TileLoader<acc_t> load_t;
  KDLossParams p;
  HostErrorRecord* errors;  // the backward's: labels may have changed since the forward
};

// Running (max, Σ exp(x - max)) with extra sums rescaled alongside; a max of
// -inf means "nothing seen yet" and is never subtracted (-inf - -inf = NaN).
template <typename acc_t>
struct Online {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  acc_t extra = 0;  // Σ exp(x - max) * (x - other): the KL cross term
  acc_t sum_t1 = 0;  // Σ exp(T (x - max)): lse at temperature 1 (student only)

  // Raises the max to include tile_max; returns false if the stream is
  // still all -inf (the tile contributes nothing).
  bool rescale(acc_t tile_max, acc_t temperature) {
    if (tile_max > max) {
      if (max != -std::numeric_limits<acc_t>::infinity()) {
        const acc_t f = std::exp(max - tile_max);
        sum *= f;
        extra *= f;
        sum_t1 *= std::exp(temperature * (max - tile_max));
      }
      max = tile_max;
    }
    return max != -std::numeric_limits<acc_t>::infinity();
  }

  acc_t lse() const { return max + std::log(sum); }
};

// --- the cancellation-free KL and JSD (kd_loss.h, docs/math.md §1.5) ---------------

// w(e) = 1 + (e - 1) e^e = sum_{n >= 2} (n - 1) / n! e^n by its series, for
// |e| <= 1/2 (where the closed form cancels; callers take b + (e - 1) b e^e
// beyond, with b e^e formed as one exp).
template <typename acc_t>
Vectorized<acc_t> ratio_weight(Vectorized<acc_t> e) {
  using Vec = Vectorized<acc_t>;
  constexpr int kTerms =
      std::is_same_v<acc_t, double> ? kRatioWeightTerms64 : kRatioWeightTerms32;
  constexpr RatioWeightSeries<kTerms> coef;
  Vec series(0);
  for (int i = kTerms - 1; i >= 0; --i) series = series * e + Vec(static_cast<acc_t>(coef.c[i]));
  return series * e * e;
}

// phi(y) = y - log1p(y) >= 0: for |y| <= 1/2 as y s - 2 sum_j s^(2j+3)/(2j+3),
// s = y / (2 + y) (from log1p(y) = 2 atanh(s)), which does not cancel.
template <typename acc_t>
Vectorized<acc_t> log1p_gap(Vectorized<acc_t> y) {
  using Vec = Vectorized<acc_t>;
  constexpr int kTerms = std::is_same_v<acc_t, double> ? kLog1pGapTerms64 : kLog1pGapTerms32;
  const Vec s = y / (Vec(2) + y), s2 = s * s;
  Vec series(0);
  for (int j = kTerms - 1; j >= 0; --j) series = series * s2 + Vec(acc_t(1) / (2 * j + 3));
  const Vec small_form = y * s - Vec(2) * s * s2 * series;
  return Vec::blendv(y - y.log1p(), small_form, y.abs() <= Vec(acc_t(0.5)));
}

// Calls f(n) for each tile of row `row`, with z/T and u/T of its n columns in
// zb and ub (padded to whole vectors with -inf).
template <typename acc_t, typename F>
void for_each_scaled_tile(const Args<acc_t>& a, int64_t row, acc_t* zb, acc_t* ub, F&& f) {
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(a.p.temperature);
  for (int64_t j0 = 0; j0 < a.p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, a.p.cols - j0);
    a.load_s(a.student, row * a.s_row_stride + j0, n, inv_t, zb);
    a.load_t(a.teacher, row * a.t_row_stride + j0, n, inv_t, ub);
    f(n);
  }
}

// Q, X and W above over one row (normalized by Q), with the student as the base
// (student_base) or the teacher.
template <typename acc_t>
struct RatioSums {
  acc_t x;  // X
  acc_t w;  // W
};

template <typename acc_t>
RatioSums<acc_t> ratio_sums(const Args<acc_t>& a, int64_t row, bool student_base, acc_t lse_base,
                            acc_t c, acc_t* zb, acc_t* ub) {
  using Vec = Vectorized<acc_t>;
  const Vec vlse(lse_base), vc(c);
  Vec vq(0), vx(0), vw(0);
  for_each_scaled_tile(a, row, zb, ub, [&](int64_t n) {
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec zv = Vec::loadu(zb + i), uv = Vec::loadu(ub + i);
      const Vec base = student_base ? zv : uv, other = student_base ? uv : zv;
      const Vec b = vexp(base - vlse);
      const Vec e = (other - base) - vc;
      // b e^e as one exp: finite where e is large, and not 0 where b underflowed
      // but the other distribution has mass (0 * inf).
      const Vec be = vexp(other - vc - vlse);
      const Vec small = e.abs() <= Vec(acc_t(0.5));
      vq += b;
      const Vec none = (b == Vec(0)) & (be == Vec(0));
      vx += Vec::blendv(Vec::blendv(be - b, b * e.expm1(), small), Vec(0), none);
      vw += Vec::blendv(Vec::blendv(b + masked_term(be, e - Vec(1)), b * ratio_weight(e), small),
                        Vec(0), none);
    }
  });
  const acc_t q = reduce_sum(vq);
  return {reduce_sum(vx) / q, reduce_sum(vw) / q};
}

// KL(other || base) from its ratio sums: W / (1 + X) + X / (1 + X) - log1p(X).
template <typename acc_t>
acc_t kl_from(const RatioSums<acc_t>& r) {
  return r.w / (acc_t(1) + r.x) + (r.x / (acc_t(1) + r.x) - std::log1p(r.x));
}

// Whether a row's divergence `soft`, computed from terms of size `magnitude`,
// needs the cancellation-free pass.
template <typename acc_t>
bool needs_stable_pass(acc_t soft, acc_t magnitude) {
  return std::isfinite(soft) && std::isfinite(magnitude) &&
         !(soft > magnitude * static_cast<acc_t>(kStableRatio));
}

// The offset of log p - log q of a row to full precision: rp = (u/T - z/T) -
// offset, offset = c + log1p(X) with c = lse(u/T) - lse(z/T) as rounded and X
// from ratio_sums over q. JSD's cancellation-free pass forms it; the forward
// saves it (kLogRatioOffset) for the backward's.
template <typename acc_t>
acc_t log_ratio_offset(const Args<acc_t>& a, int64_t row, acc_t lse_s, acc_t lse_t, acc_t* zb,
                       acc_t* ub) {
  return (lse_t - lse_s) + std::log1p(ratio_sums(a, row, true, lse_s, lse_t - lse_s, zb, ub).x);
}

// log q - log m and log p - log m from rp = log p - log q, to full precision
// near rp = 0 (log1p of a small expm1) and without overflow far from it
// (a logaddexp of the mixture weights).
template <typename acc_t>
struct MixtureLogs {
  Vectorized<acc_t> beta, one_minus_beta, log_beta, log_one_minus_beta;
  explicit MixtureLogs(double b)
      : beta(static_cast<acc_t>(b)), one_minus_beta(static_cast<acc_t>(1.0 - b)),
        log_beta(static_cast<acc_t>(std::log(b))),
        log_one_minus_beta(static_cast<acc_t>(std::log1p(-b))) {}

  static Vectorized<acc_t> log_add_exp(Vectorized<acc_t> a, Vectorized<acc_t> b) {
    using Vec = Vectorized<acc_t>;
    const Vec hi = at::vec::maximum(a, b), lo = at::vec::minimum(a, b);
    return hi + vexp(lo - hi).log1p();
  }
  // -log(1 - beta + beta e^rp)
  Vectorized<acc_t> student(Vectorized<acc_t> rp) const {
    using Vec = Vectorized<acc_t>;
    return Vec::blendv(Vec(0) - log_add_exp(log_one_minus_beta, log_beta + rp),
                       Vec(0) - (beta * rp.expm1()).log1p(), rp.abs() <= Vec(acc_t(0.5)));
  }
  // -log(beta + (1 - beta) e^-rp)
  Vectorized<acc_t> teacher(Vectorized<acc_t> rp) const {
    using Vec = Vectorized<acc_t>;
    const Vec nrp = Vec(0) - rp;
    return Vec::blendv(Vec(0) - log_add_exp(log_beta, log_one_minus_beta + nrp),
                       Vec(0) - (one_minus_beta * nrp.expm1()).log1p(), rp.abs() <= Vec(acc_t(0.5)));
  }
};

// JSD by non-negative terms: with rp = log p - log q, log p - log m =
// -log1p((1 - beta) expm1(-rp)) and sum p (1 - beta) expm1(-rp) = 0, so
// KL(p||m) = sum p phi((1 - beta) expm1(-rp)); likewise
// KL(q||m) = sum q phi(beta expm1(rp)).
template <typename acc_t>
std::pair<acc_t, acc_t> stable_jsd(const Args<acc_t>& a, int64_t row, acc_t lse_s, acc_t lse_t,
                                   acc_t offset, acc_t* zb, acc_t* ub) {
  using Vec = Vectorized<acc_t>;
  const Vec vls(lse_s), vlt(lse_t), voff(offset);
  const MixtureLogs<acc_t> mix(a.p.beta);
  Vec dt(0), ds(0);
  for_each_scaled_tile(a, row, zb, ub, [&](int64_t n) {
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec zv = Vec::loadu(zb + i), uv = Vec::loadu(ub + i);
      const Vec rp = (uv - zv) - voff;
      const Vec pv = vexp(uv - vlt), qv = vexp(zv - vls);
      // Near rp = 0 the phi forms; beyond, p (log p - log m) + (1 - beta)(q - p),
      // which is p phi(...) without its expm1 overflowing.
      const Vec small = rp.abs() <= Vec(acc_t(0.5));
      dt += Vec::blendv(masked_term(pv, mix.teacher(rp)) + mix.one_minus_beta * (qv - pv),
                        masked_term(pv, log1p_gap(mix.one_minus_beta * (Vec(0) - rp).expm1())),
                        small);
      ds += Vec::blendv(masked_term(qv, mix.student(rp)) + mix.beta * (pv - qv),
                        masked_term(qv, log1p_gap(mix.beta * rp.expm1())), small);
    }
  });
  return {reduce_sum(dt), reduce_sum(ds)};
}

template <typename acc_t>
bool row_ignored(const Args<acc_t>& a, int64_t row) {
  return a.labels != nullptr && a.labels[row] == a.p.ignore_index;
}

template <typename acc_t>
acc_t label_logit(const Args<acc_t>& a, int64_t row) {
  // load_tile pads to a whole vector, so the one-element read needs room for it.
  alignas(64) acc_t z_y[Vectorized<acc_t>::size()];
  a.load_s(a.student, row * a.s_row_stride + a.labels[row], 1, acc_t(1), z_y);
  return z_y[0];
}

// What forward_grad's forward keeps of a row for its gradient pass, so that
// pass forms q and p without an exp (two of the four per element): for tile j,
// es = exp(z/T - ms[j]) and et = exp(u/T - mt[j]), ms[j] and mt[j] the online
// maxima after that tile (-inf while the stream is all -inf; es = et = 0 there),
// so q = es exp(ms[j] - lse(z/T)) and p = et exp(mt[j] - lse(u/T)).
template <typename acc_t>
struct RowExps {
  acc_t* es;  // cols rounded up to whole vectors
  acc_t* et;
  acc_t* ms;  // one per tile
  acc_t* mt;
};

template <typename acc_t>
void forward_row(const Args<acc_t>& a, int64_t row, acc_t* zb, acc_t* ub, acc_t* loss,
                 acc_t* stats, const RowExps<acc_t>* keep = nullptr) {
  using Vec = Vectorized<acc_t>;
  const KDLossParams& p = a.p;
  acc_t* st = stats + row * kd_loss_stats::kCols;
  if (row_ignored(a, row)) {
    loss[row] = 0;
    for (int64_t k = 0; k < kd_loss_stats::kCols; ++k) st[k] = 0;
    return;
  }
  const acc_t T = static_cast<acc_t>(p.temperature);
  const acc_t inv_t = acc_t(1) / T;
  const bool fwd = p.divergence == Divergence::ForwardKL;
  const bool rev = p.divergence == Divergence::ReverseKL;
  const bool lse_t1 = p.hard && p.temperature != 1.0;
  Online<acc_t> s, t;
  const int64_t s_off = row * a.s_row_stride, t_off = row * a.t_row_stride;

  for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, p.cols - j0);
    a.load_s(a.student, s_off + j0, n, inv_t, zb);
    a.load_t(a.teacher, t_off + j0, n, inv_t, ub);
    const int64_t n_vec = (n + Vec::size() - 1) / Vec::size() * Vec::size();
    Vec zmax(-std::numeric_limits<acc_t>::infinity()), umax = zmax;
    for (int64_t i = 0; i < n_vec; i += Vec::size()) {
      zmax = at::vec::maximum(zmax, Vec::loadu(zb + i));
      umax = at::vec::maximum(umax, Vec::loadu(ub + i));
    }
    const bool s_live = s.rescale(reduce_max(zmax), T);
    const bool t_live = t.rescale(reduce_max(umax), T);
    const Vec sm(s.max), tm(t.max), vt(T);
    Vec s_sum(0), t_sum(0), s_extra(0), t_extra(0), s_sum1(0);
    for (int64_t i = 0; i < n_vec; i += Vec::size()) {
      const Vec zv = Vec::loadu(zb + i), uv = Vec::loadu(ub + i);
      Vec et(0), es(0);
      if (t_live) {
        et = vexp(uv - tm);
        t_sum += et;
        if (fwd) t_extra += masked_term(et, uv - zv);
      }
      if (s_live) {
        es = vexp(zv - sm);
        s_sum += es;
        if (rev) s_extra += masked_term(es, zv - uv);
        if (lse_t1) s_sum1 += vexp((zv - sm) * vt);
      }
      if (keep != nullptr) {
        es.store(keep->es + j0 + i);
        et.store(keep->et + j0 + i);
      }
    }
    if (keep != nullptr) {
      keep->ms[j0 / kTile] = s.max;
      keep->mt[j0 / kTile] = t.max;
    }
    s.sum += reduce_sum(s_sum);
    s.extra += reduce_sum(s_extra);
    s.sum_t1 += reduce_sum(s_sum1);
    t.sum += reduce_sum(t_sum);
    t.extra += reduce_sum(t_extra);
  }

  const acc_t lse_s = s.lse(), lse_t = t.lse();
  // Cross terms: Σ p (us - zs) = extra_t / sum_t, so KL(p||q) = that - lse_t + lse_s.
  acc_t d_student = rev ? s.extra / s.sum - lse_s + lse_t : acc_t(0);
  acc_t d_teacher = fwd ? t.extra / t.sum - lse_t + lse_s : acc_t(0);
  if (p.divergence == Divergence::JSD) {
    // log m needs both normalized distributions: a second pass.
    const acc_t beta = static_cast<acc_t>(p.beta);
    const Vec vb(beta), vb1(acc_t(1) - beta), vls(lse_s), vlt(lse_t);
    Vec ds(0), dt(0);
    for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
      const int64_t n = std::min(kTile, p.cols - j0);
      a.load_s(a.student, s_off + j0, n, inv_t, zb);
      a.load_t(a.teacher, t_off + j0, n, inv_t, ub);
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const Vec lq = Vec::loadu(zb + i) - vls, lp = Vec::loadu(ub + i) - vlt;
        const Vec q = vexp(lq), pp = vexp(lp);
        const Vec lm = (vb * pp + vb1 * q).log();
        ds += masked_term(q, lq - lm);
        dt += masked_term(pp, lp - lm);
      }
    }
    d_student = reduce_sum(ds);
    d_teacher = reduce_sum(dt);
  }
  // Rows where cancellation took the one-pass result's digits (p ~ q). Their
  // pass also gives lse(u/T) - lse(z/T) to full precision (c + log1p(X), for any
  // reference c), which the backward's cancellation-free pass reads instead of
  // summing the row once more; the other rows keep the rounded difference, which
  // the backward never reads (its test on the final divergence takes that pass
  // only on rows that took it here).
  const acc_t lse_mag = std::abs(lse_s) + std::abs(lse_t);
  acc_t offset = lse_t - lse_s;
  if (fwd && needs_stable_pass(d_teacher, lse_mag + std::abs(t.extra / t.sum))) {
    const acc_t c = t.extra / t.sum;
    const RatioSums<acc_t> r = ratio_sums(a, row, true, lse_s, c, zb, ub);
    d_teacher = kl_from(r);
    offset = c + std::log1p(r.x);
  } else if (rev && needs_stable_pass(d_student, lse_mag + std::abs(s.extra / s.sum))) {
    // Base p: lse(z/T) - lse(u/T) = c + log1p(X).
    const acc_t c = s.extra / s.sum;
    const RatioSums<acc_t> r = ratio_sums(a, row, false, lse_t, c, zb, ub);
    d_student = kl_from(r);
    offset = -(c + std::log1p(r.x));
  } else if (p.divergence == Divergence::JSD &&
             needs_stable_pass(std::min(d_teacher, d_student), lse_mag)) {
    offset = log_ratio_offset(a, row, lse_s, lse_t, zb, ub);
    std::tie(d_teacher, d_student) = stable_jsd(a, row, lse_s, lse_t, offset, zb, ub);
  }
  const acc_t soft = fwd ? d_teacher
                         : rev ? d_student
                               : static_cast<acc_t>(p.beta) * d_teacher +
                                     (acc_t(1) - static_cast<acc_t>(p.beta)) * d_student;
  acc_t out = static_cast<acc_t>(p.soft_scale) * soft;
  acc_t lse1 = lse_s;
  if (p.hard) {
    if (lse_t1) lse1 = T * s.max + std::log(s.sum_t1);
    out += static_cast<acc_t>(p.hard_weight) * (lse1 - label_logit(a, row));
  }
  loss[row] = out;
  st[kd_loss_stats::kLseStudent] = lse_s;
  st[kd_loss_stats::kLseTeacher] = lse_t;
  st[kd_loss_stats::kLseStudentT1] = lse1;
  st[kd_loss_stats::kDStudent] = d_student;
  st[kd_loss_stats::kDTeacher] = d_teacher;
  st[kd_loss_stats::kLogRatioOffset] = offset;
}

// Whether the gradient of a row with stats `st` takes the cancellation-free
// pass: its forward's divergence is tiny next to the lse values.
template <typename acc_t>
bool gradient_needs_stable_pass(const KDLossParams& p, const acc_t* st) {
  const acc_t lse_s = st[kd_loss_stats::kLseStudent], lse_t = st[kd_loss_stats::kLseTeacher];
  const acc_t d_soft = p.divergence == Divergence::ForwardKL ? st[kd_loss_stats::kDTeacher]
                       : p.divergence == Divergence::ReverseKL
                           ? st[kd_loss_stats::kDStudent]
                           : std::min(st[kd_loss_stats::kDTeacher], st[kd_loss_stats::kDStudent]);
  return needs_stable_pass(d_soft, std::abs(lse_s) + std::abs(lse_t));
}

// The gradient of g * loss[row] from the row's stats; g is the upstream
// gradient (backward) or the caller's scale (forward_grad, with the stats the
// forward just wrote, while the row is still in cache).
template <typename acc_t>
void backward_row(const Args<acc_t>& a, int64_t row, acc_t g, const acc_t* stats, TileStorer<acc_t> store_s, void* grad_s,
                  TileStorer<acc_t> store_t, void* grad_t, acc_t* zb, acc_t* ub) {
  using Vec = Vectorized<acc_t>;
  const KDLossParams& p = a.p;
  const int64_t s_off = row * a.s_row_stride, t_off = row * a.t_row_stride;
  const int64_t out_off = row * p.cols;
  const bool bad_label = a.labels != nullptr && !row_ignored(a, row) &&
                         (a.labels[row] < 0 || a.labels[row] >= p.cols);
  if (bad_label) {
    a.errors->record(InputError::kLabel, row, -1, a.labels[row], p.cols, p.ignore_index);
  }
  if (row_ignored(a, row) || bad_label) {
    std::fill(zb, zb + std::min(kTile, p.cols), acc_t(0));
    for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
      const int64_t n = std::min(kTile, p.cols - j0);
      store_s(zb, n, grad_s, out_off + j0);
      if (grad_t) store_t(zb, n, grad_t, out_off + j0);
    }
    return;
  }
  const acc_t* st = stats + row * kd_loss_stats::kCols;
  const acc_t T = static_cast<acc_t>(p.temperature);
  const acc_t inv_t = acc_t(1) / T;
  const acc_t c = g * static_cast<acc_t>(p.soft_scale) * inv_t;
  const acc_t beta = static_cast<acc_t>(p.beta);
  const bool fwd = p.divergence == Divergence::ForwardKL;
  const bool rev = p.divergence == Divergence::ReverseKL;
  // JSD: the student side carries (1 - beta), the teacher side beta.
  const Vec cs(p.divergence == Divergence::JSD ? c * (acc_t(1) - beta) : c);
  const Vec ct(p.divergence == Divergence::JSD ? c * beta : c);
  const Vec vls(st[kd_loss_stats::kLseStudent]), vlt(st[kd_loss_stats::kLseTeacher]);
  const Vec vl1(st[kd_loss_stats::kLseStudentT1]);
  const Vec vds(st[kd_loss_stats::kDStudent]), vdt(st[kd_loss_stats::kDTeacher]);
  const Vec vb(beta), vb1(acc_t(1) - beta), vT(T), hc(g * static_cast<acc_t>(p.hard_weight));
  const int64_t y = p.hard ? a.labels[row] : -1;
  // Where the forward's divergence is tiny next to the lse values, q - p and
  // the log ratios cancel as well: they are formed from rp = log p - log q to
  // full precision, rp = (u/T - z/T) - the saved offset (the forward's pass
  // formed it; a caller that builds the stats, vocab-parallel KD, gives the
  // offset of the whole row, which no pass over this row's columns could),
  // q - p = -q expm1(rp).
  const bool stable = gradient_needs_stable_pass(p, st);
  const Vec voff(stable ? st[kd_loss_stats::kLogRatioOffset] : acc_t(0));
  const MixtureLogs<acc_t> mix(p.divergence == Divergence::JSD ? p.beta : 0.5);

  for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, p.cols - j0);
    a.load_s(a.student, s_off + j0, n, inv_t, zb);
    a.load_t(a.teacher, t_off + j0, n, inv_t, ub);
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec zv = Vec::loadu(zb + i);
      const Vec lq = zv - vls, lp = Vec::loadu(ub + i) - vlt;
      const Vec q = vexp(lq), pp = vexp(lp);
      Vec dz, du;
      if (stable) {
        const Vec rp = (Vec::loadu(ub + i) - zv) - voff;
        // p - q = q expm1(rp) near rp = 0, p - q itself beyond.
        const Vec p_minus_q =
            Vec::blendv(pp - q, masked_term(q, rp.expm1()), rp.abs() <= Vec(acc_t(0.5)));
        if (fwd) {
          dz = cs * p_minus_q * Vec(-1);
          du = ct * masked_term(pp, rp - vdt);
        } else if (rev) {
          dz = cs * masked_term(q, Vec(0) - rp - vds);
          du = ct * p_minus_q;
        } else {
          dz = cs * masked_term(q, mix.student(rp) - vds);
          du = ct * masked_term(pp, mix.teacher(rp) - vdt);
        }
      } else if (fwd) {
        dz = cs * (q - pp);
        du = ct * masked_term(pp, lp - lq - vdt);
      } else if (rev) {
        dz = cs * masked_term(q, lq - lp - vds);
        du = ct * (pp - q);
      } else {
        const Vec lm = (vb * pp + vb1 * q).log();
        dz = cs * masked_term(q, lq - lm - vds);
        du = ct * masked_term(pp, lp - lm - vdt);
      }
      if (p.hard) dz += hc * vexp(zv * vT - vl1);  // softmax(z) at T = 1
      dz.store(zb + i);
      du.store(ub + i);
    }
    if (p.hard && y >= j0 && y < j0 + n) zb[y - j0] -= g * static_cast<acc_t>(p.hard_weight);
    store_s(zb, n, grad_s, out_off + j0);
    if (grad_t) store_t(ub, n, grad_t, out_off + j0);
  }
}

// Whether forward_grad forms the gradient of a row from the forward's
// exponentials (RowExps) rather than with backward_row: KL rows whose
// gradient needs only q, p and the log ratio (JSD's log m needs a pass of its
// own; the hard term at T != 1 an exp of its own), the rows of the plain
// formulas (finite lse's, no cancellation-free pass), labels checked.
template <typename acc_t>
bool gradient_from_kept_exps(const Args<acc_t>& a, int64_t row, const acc_t* stats) {
  const KDLossParams& p = a.p;
  const acc_t* st = stats + row * kd_loss_stats::kCols;
  return p.divergence != Divergence::JSD && !(p.hard && p.temperature != 1.0) &&
         !row_ignored(a, row) && std::isfinite(st[kd_loss_stats::kLseStudent]) &&
         std::isfinite(st[kd_loss_stats::kLseTeacher]) && !gradient_needs_stable_pass(p, st);
}

// backward_row's plain formulas on such a row, with q and p from the kept
// exponentials: forward KL's student gradient c (q - p) reads no logits;
// the log ratios (the other gradient, reverse KL) load the row's tiles again,
// from cache.
template <typename acc_t>
void backward_row_kept(const Args<acc_t>& a, int64_t row, acc_t g, const acc_t* stats,
                       const RowExps<acc_t>& kept, TileStorer<acc_t> store_s, void* grad_s,
                       TileStorer<acc_t> store_t, void* grad_t, acc_t* zb, acc_t* ub) {
  using Vec = Vectorized<acc_t>;
  const KDLossParams& p = a.p;
  const acc_t* st = stats + row * kd_loss_stats::kCols;
  const acc_t inv_t = acc_t(1) / static_cast<acc_t>(p.temperature);
  const acc_t c = g * static_cast<acc_t>(p.soft_scale) * inv_t;
  const bool fwd = p.divergence == Divergence::ForwardKL;
  const bool log_ratio = fwd ? grad_t != nullptr : true;
  const acc_t lse_s = st[kd_loss_stats::kLseStudent], lse_t = st[kd_loss_stats::kLseTeacher];
  const Vec vc(c), vls(lse_s), vlt(lse_t);
  const Vec vds(st[kd_loss_stats::kDStudent]), vdt(st[kd_loss_stats::kDTeacher]);
  const Vec hc(g * static_cast<acc_t>(p.hard_weight));
  const int64_t y = p.hard ? a.labels[row] : -1;
  const int64_t s_off = row * a.s_row_stride, t_off = row * a.t_row_stride;
  const int64_t out_off = row * p.cols;
  for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, p.cols - j0);
    // exp(-inf - lse) = 0: a tile before any live entry keeps q = 0.
    const Vec fs(std::exp(kept.ms[j0 / kTile] - lse_s)), ft(std::exp(kept.mt[j0 / kTile] - lse_t));
    if (log_ratio) {
      a.load_s(a.student, s_off + j0, n, inv_t, zb);
      a.load_t(a.teacher, t_off + j0, n, inv_t, ub);
    }
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec q = Vec::loadu(kept.es + j0 + i) * fs, pp = Vec::loadu(kept.et + j0 + i) * ft;
      // lp - lq = (u/T - z/T) - (lse(u/T) - lse(z/T)), as backward_row forms it.
      const Vec lq = log_ratio ? Vec::loadu(zb + i) - vls : Vec(0);
      const Vec lp = log_ratio ? Vec::loadu(ub + i) - vlt : Vec(0);
      Vec dz, du(0);
      if (fwd) {
        dz = vc * (q - pp);
        if (grad_t != nullptr) du = vc * masked_term(pp, lp - lq - vdt);
      } else {
        dz = vc * masked_term(q, lq - lp - vds);
        du = vc * (pp - q);
      }
      if (p.hard) dz += hc * q;  // softmax(z) at T = 1 is q
      dz.store(zb + i);
      du.store(ub + i);
    }
    if (p.hard && y >= j0 && y < j0 + n) zb[y - j0] -= g * static_cast<acc_t>(p.hard_weight);
    store_s(zb, n, grad_s, out_off + j0);
    if (grad_t) store_t(ub, n, grad_t, out_off + j0);
  }
}

template <typename acc_t>
Args<acc_t> make_args(const at::Tensor& s, const at::Tensor& t,
                      const std::optional<at::Tensor>& labels, const KDLossParams& p,
                      HostErrorRecord* errors) {
  Args<acc_t> a;
  a.errors = errors;
  a.student = s.data_ptr();
  a.teacher = t.data_ptr();
  a.s_row_stride = s.stride(0);
  a.t_row_stride = t.stride(0);
  a.labels = p.has_labels ? labels->data_ptr<int64_t>() : nullptr;
  a.load_s = loader_for<acc_t>(s.scalar_type());
  a.load_t = loader_for<acc_t>(t.scalar_type());
  a.p = p;
  return a;
}

// What every pass reads: the logits with a unit class stride (rows may be
// strided) and contiguous labels.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> row_inputs(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const KDLossParams& p) {
  return {unit_stride_rows(student_logits), unit_stride_rows(teacher_logits),
          p.has_labels ? std::optional<at::Tensor>(labels->contiguous()) : std::nullopt};
}

// The gradients, in resident memory (output_cache.h); the teacher's is an
// empty (0,) tensor unless it is wanted.
std::pair<at::Tensor, at::Tensor> gradient_buffers(const at::Tensor& s, const at::Tensor& t,
                                                   bool teacher_grad) {
  return {empty_like_cached(s), teacher_grad ? empty_like_cached(t) : at::empty({0}, t.options())};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, double temperature,
    c10::string_view divergence, double beta, double hard_weight, int64_t ignore_index,
    bool scale_by_t2) {
  const KDLossParams p = check_kd_loss_args(student_logits, teacher_logits, labels, temperature,
                                            divergence, beta, hard_weight, ignore_index,
                                            scale_by_t2);
  if (p.has_labels) check_label_values(*labels, p.cols, ignore_index);
  const auto [s, t, y] = row_inputs(student_logits, teacher_logits, labels, p);
  const auto opts = s.options().dtype(acc_scalar_type(s));
  at::Tensor loss = at::empty({p.rows}, opts);
  at::Tensor stats = at::empty({p.rows, kd_loss_stats::kCols}, opts);
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "kd_loss_forward_cpu", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(s, t, y, p, nullptr);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t zb[kTile];
      alignas(64) scalar_t ub[kTile];
      for (int64_t row = begin; row < end; ++row) forward_row(a, row, zb, ub, loss_ptr, stats_ptr);
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student_logits,
    const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& stats, double temperature, c10::string_view divergence, double beta,
    double hard_weight, int64_t ignore_index, bool scale_by_t2, bool teacher_grad) {
  const KDLossParams p = check_kd_loss_args(student_logits, teacher_logits, labels, temperature,
                                            divergence, beta, hard_weight, ignore_index,
                                            scale_by_t2);
  check_kd_loss_backward_args(grad_loss, stats, student_logits, p);
  const auto [s, t, y] = row_inputs(student_logits, teacher_logits, labels, p);
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor st = stats.contiguous();
  auto [grad_s, grad_t] = gradient_buffers(s, t, teacher_grad);
  HostErrorRecord errors;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kd_loss_backward_cpu", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(s, t, y, p, &errors);
    const TileStorer<scalar_t> store_s = storer_for<scalar_t>(s.scalar_type());
    const TileStorer<scalar_t> store_t = storer_for<scalar_t>(t.scalar_type());
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const scalar_t* st_ptr = st.data_ptr<scalar_t>();
    void* gs_ptr = grad_s.data_ptr();
    void* gt_ptr = teacher_grad ? grad_t.data_ptr() : nullptr;
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t zb[kTile];
      alignas(64) scalar_t ub[kTile];
      for (int64_t row = begin; row < end; ++row) {
        backward_row(a, row, g_ptr[row], st_ptr, store_s, gs_ptr, store_t, gt_ptr, zb, ub);
      }
    });
  });
  errors.raise_if_any();
  return {grad_s, grad_t};
}

// The forward and, per row right after it, the gradient of scale[row] * loss[row]
// (scale = grad_scale, or 1 without one): the logits are read from memory once,
// the gradient passes find the row in cache (a (32000,) fp32 row pair is 256 KB).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_grad_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad_scale,
    double temperature, c10::string_view divergence, double beta, double hard_weight,
    int64_t ignore_index, bool scale_by_t2, bool teacher_grad) {
  const KDLossParams p = check_kd_loss_args(student_logits, teacher_logits, labels, temperature,
                                            divergence, beta, hard_weight, ignore_index,
                                            scale_by_t2);
  check_kd_loss_grad_scale(grad_scale, student_logits, p.rows);
  if (p.has_labels) check_label_values(*labels, p.cols, ignore_index);
  const auto [s, t, y] = row_inputs(student_logits, teacher_logits, labels, p);
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->contiguous() : at::Tensor();
  const auto opts = s.options().dtype(acc_scalar_type(s));
  at::Tensor loss = at::empty({p.rows}, opts);
  at::Tensor stats = at::empty({p.rows, kd_loss_stats::kCols}, opts);
  auto [grad_s, grad_t] = gradient_buffers(s, t, teacher_grad);
  HostErrorRecord errors;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "kd_loss_forward_grad_cpu", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(s, t, y, p, &errors);
    const TileStorer<scalar_t> store_s = storer_for<scalar_t>(s.scalar_type());
    const TileStorer<scalar_t> store_t = storer_for<scalar_t>(t.scalar_type());
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    // A 0-d grad_scale scales every row: stride 0.
    const scalar_t* scale_ptr = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
    const int64_t scale_stride = scale.defined() && scale.dim() == 1 ? 1 : 0;
    void* gs_ptr = grad_s.data_ptr();
    void* gt_ptr = teacher_grad ? grad_t.data_ptr() : nullptr;
    using Vec = Vectorized<scalar_t>;
    const int64_t padded = (p.cols + Vec::size() - 1) / Vec::size() * Vec::size();
    const int64_t tiles = (p.cols + kTile - 1) / kTile;
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t zb[kTile];
      alignas(64) scalar_t ub[kTile];
      // This thread's RowExps: 2 x cols of the accumulation type, which stay in
      // cache between a row's two passes as its logits do.
      std::vector<scalar_t> buffer(2 * padded + 2 * tiles);
      const RowExps<scalar_t> kept{buffer.data(), buffer.data() + padded,
                                   buffer.data() + 2 * padded, buffer.data() + 2 * padded + tiles};
      for (int64_t row = begin; row < end; ++row) {
        forward_row(a, row, zb, ub, loss_ptr, stats_ptr, &kept);
        const scalar_t g = scale_ptr != nullptr ? scale_ptr[row * scale_stride] : scalar_t(1);
        if (gradient_from_kept_exps(a, row, stats_ptr)) {
          backward_row_kept(a, row, g, stats_ptr, kept, store_s, gs_ptr, store_t, gt_ptr, zb, ub);
        } else {
          backward_row(a, row, g, stats_ptr, store_s, gs_ptr, store_t, gt_ptr, zb, ub);
        }
      }
    });
  });
  errors.raise_if_any();
  return {loss, stats, grad_s, grad_t};
}

// g[i] * G[i, :] into a resident buffer (empty_like_cached): a fresh N x C
// allocation would page-fault on every step, which costs more than the
// multiply itself.
// dst[i, :] = g[i] * src[i, :] for contiguous (rows, cols) src and dst, the
// products in the accumulation type and rounded once. In place (dst == src)
// a row whose g is 1 is left as it is: no pass over it.
void scale_rows(const at::Tensor& src, const at::Tensor& g, at::Tensor& dst) {
  const int64_t rows = src.size(0), cols = src.size(1);
  const bool in_place = src.data_ptr() == dst.data_ptr();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kd_loss_scale_grad_cpu", [&] {
    const TileLoader<scalar_t> load = loader_for<scalar_t>(src.scalar_type());
    const TileStorer<scalar_t> store = storer_for<scalar_t>(src.scalar_type());
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const int64_t g_stride = g.dim() == 1 ? 1 : 0;
    const void* in = src.data_ptr();
    void* out = dst.data_ptr();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t buf[kTile];
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t f = g_ptr[row * g_stride];
        if (in_place && f == scalar_t(1)) continue;
        for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
          const int64_t n = std::min(kTile, cols - j0);
          load(in, row * cols + j0, n, f, buf);  // loads scaled by f
          store(buf, n, out, row * cols + j0);
        }
      }
    });
  });
}

at::Tensor kd_loss_scale_grad_cpu(const at::Tensor& unit_grad, const at::Tensor& grad_rows) {
  check_kd_loss_scale_grad_args(unit_grad, grad_rows);
  const at::Tensor unit = unit_grad.contiguous();
  at::Tensor out = empty_like_cached(unit);
  scale_rows(unit, grad_rows.contiguous(), out);
  return out;
}

void kd_loss_scale_grad__cpu(at::Tensor& grad, const at::Tensor& grad_rows) {
  check_kd_loss_scale_grad_in_place_args(grad, grad_rows);
  scale_rows(grad, grad_rows.contiguous(), grad);
}

}  // namespace
}  // namespace distillkit::cpu::inline CPU_CAPABILITY

DK_CPU_KERNEL(kd_loss_forward, kd_loss_forward_cpu)
DK_CPU_KERNEL(kd_loss_backward, kd_loss_backward_cpu)
DK_CPU_KERNEL(kd_loss_forward_grad, kd_loss_forward_grad_cpu)
DK_CPU_KERNEL(kd_loss_scale_grad, kd_loss_scale_grad_cpu)
DK_CPU_KERNEL(kd_loss_scale_grad_, kd_loss_scale_grad__cpu)

// Registered once, by the default level's build (it runs on every CPU); each call
// goes to the chosen level's kernel.
#if defined(CPU_CAPABILITY_DEFAULT)
TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("kd_loss_forward", DK_CPU_DISPATCH(kd_loss_forward));
  m.impl("kd_loss_backward", DK_CPU_DISPATCH(kd_loss_backward));
  m.impl("kd_loss_forward_grad", DK_CPU_DISPATCH(kd_loss_forward_grad));
  m.impl("kd_loss_scale_grad", DK_CPU_DISPATCH(kd_loss_scale_grad));
  m.impl("kd_loss_scale_grad_", DK_CPU_DISPATCH(kd_loss_scale_grad_));
}
#endif
