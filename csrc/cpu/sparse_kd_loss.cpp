// CPU kernels of sparse_kd_loss (docs/math.md §4); the math and the stats layout
// are in sparse_kd_loss.h. Rows run in parallel, one thread per row, so
// results are the same bits for any thread count. Per row:
//   forward:  K gathers of (l_k, z[I_k]) build the teacher's online
//             log-sum-exp and cross term sum_k exp(l_k - m) (l_k - z[I_k]/T),
//             then one tiled pass over z gives lse(z/T) (skipped for a dead
//             row). The teacher never becomes an N x C tensor.
//   backward: one tiled pass writes dz_j = c * mass * q_j, then the K kept
//             classes are overwritten with c * (mass * q_j - p_k): the
//             gradient is recomputed from z and the row stats (no N x C
//             buffer is kept from the forward), and every element is
//             rounded once. Indices are unique (checked in the forward), so
//             no class is written twice.
// With a tail bucket (or a divergence other than forward KL) the forward
// takes a second pass over the K kept entries once lse(z/T) and the teacher's
// normalizer are known: the per-bucket terms need both normalized sides.
// Both read each index where they use it: one outside [0, C) (the indices
// may have changed since the forward checked them, e.g. edited in place
// through numpy) is never dereferenced; it is recorded and raised when the
// kernel returns.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "cpu/vec_tiles.h"
#include "cpu_value_checks.h"
#include "input_errors.h"
#include "row_loss.h"
#include "sparse_kd_loss.h"
#include "stats_layout.h"

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using namespace cpu;

template <typename acc_t>
struct Args {
  const void* student;
  const void* logprobs;
  const void* tail;        // (N,) teacher_tail_logprob, nullptr without a tail
  const int64_t* indices;  // (N, K), contiguous
  const int64_t* labels;   // nullptr without labels
  int64_t s_row_stride;
  TileLoader<acc_t> load_s;
  TileLoader<acc_t> load_t;
  SparseKDLossParams p;
  HostErrorRecord* errors;
};

// Entry k of the row's indices: the class, or -1 for padding and for an
// index outside [0, C), which is recorded and never dereferenced.
template <typename acc_t>
int64_t kept_class(const Args<acc_t>& a, int64_t row, int64_t k) {
  const int64_t j = a.indices[row * a.p.k + k];
  if (j >= a.p.cols || j < -1) {
    a.errors->record(InputError::kTeacherIndex, row, k, j, a.p.cols);
    return -1;
  }
  return j;
}

// One element through a tile loader (which pads its output to a whole vector).
template <typename acc_t>
acc_t load_one(TileLoader<acc_t> load, const void* base, int64_t offset, acc_t scale) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  load(base, offset, 1, scale, buf);
  return buf[0];
}

template <typename acc_t>
bool label_ignored(const Args<acc_t>& a, int64_t row) {
  return a.labels != nullptr && a.labels[row] == a.p.ignore_index;
}

// lse(z/T) of one row as (max, sum exp(z/T - max)): one tiled pass with a
// running max; a max of -inf means "nothing seen yet" and is never
// subtracted (-inf - -inf = NaN).
template <typename acc_t>
std::pair<acc_t, acc_t> student_lse(const Args<acc_t>& a, int64_t row, acc_t* zb) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t inv_t = static_cast<acc_t>(1.0 / a.p.temperature);
  acc_t max = kNegInf, sum = 0;
  for (int64_t j0 = 0; j0 < a.p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, a.p.cols - j0);
    a.load_s(a.student, row * a.s_row_stride + j0, n, inv_t, zb);
    const int64_t n_vec = (n + Vec::size() - 1) / Vec::size() * Vec::size();
    Vec vmax(kNegInf);
    for (int64_t i = 0; i < n_vec; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(zb + i));
    const acc_t tile_max = reduce_max(vmax);
    if (tile_max > max) {
      if (max != kNegInf) sum *= std::exp(max - tile_max);
      max = tile_max;
    }
    if (max == kNegInf) continue;
    const Vec vm(max);
    Vec s(0);
    for (int64_t i = 0; i < n_vec; i += Vec::size()) s += vexp(Vec::loadu(zb + i) - vm);
    sum += reduce_sum(s);
  }
  return {max, sum};
}

// log(e^a + e^b), -inf when both are.
template <typename acc_t>
acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t hi = std::max(a, b), lo = std::min(a, b);
  return hi == -std::numeric_limits<acc_t>::infinity() ? hi : hi + std::log1p(std::exp(lo - hi));
}

// w (la - lb) with 0 log 0 = 0: a bucket of zero weight contributes nothing.
template <typename acc_t>
acc_t xlog_ratio(acc_t w, acc_t la, acc_t lb) {
  return w == 0 ? acc_t(0) : w * (la - lb);
}

// Per-bucket terms of the divergence (docs/math.md §4.1) from the bucket's log
// P and log Q: d is D's term (forward or reverse KL) or KL(P || M)'s (JSD),
// ds KL(Q || M)'s (JSD only).
template <typename acc_t>
struct BucketTerms {
  Divergence div;
  acc_t log_beta, log_1m_beta;

  acc_t log_m(acc_t lp, acc_t lq) const { return log_add_exp(log_beta + lp, log_1m_beta + lq); }

  void add(acc_t lp, acc_t lq, acc_t& d, acc_t& ds) const {
    const acc_t P = std::exp(lp), Q = std::exp(lq);
    if (div == Divergence::ForwardKL) {
      d += xlog_ratio(P, lp, lq);
    } else if (div == Divergence::ReverseKL) {
      d += xlog_ratio(Q, lq, lp);
    } else {
      const acc_t lm = log_m(lp, lq);
      d += xlog_ratio(P, lp, lm);
      ds += xlog_ratio(Q, lq, lm);
    }
  }

  // G_b - Gbar of a bucket for reverse KL and JSD: d/dx_j = q_j (G_b - Gbar)
  // for the classes in it; `dval` is the row's D (reverse) or D_s (JSD).
  acc_t bracket(acc_t lp, acc_t lq, acc_t dval, acc_t beta) const {
    if (div == Divergence::ReverseKL) return lq - lp - dval;
    return (1 - beta) * (lq - log_m(lp, lq) - dval);
  }

  // A kept class's d/dx_j = Q_b (G_b - Gbar); `mass` is the row's sum of P.
  acc_t grad(acc_t lp, acc_t lq, acc_t mass, acc_t dval, acc_t beta) const {
    const acc_t Q = std::exp(lq);
    if (div == Divergence::ForwardKL) return mass * Q - std::exp(lp);
    return Q == 0 ? acc_t(0) : Q * bracket(lp, lq, dval, beta);
  }
};

template <typename acc_t>
BucketTerms<acc_t> bucket_terms(const SparseKDLossParams& p) {
  return {p.divergence, static_cast<acc_t>(std::log(p.beta)),
          static_cast<acc_t>(std::log1p(-p.beta))};
}

// log(1 - s) for s = sum of the student's kept probabilities: the student's
// tail bucket. -inf once s rounds to 1 or above, and when every class is kept
// (no tail class: 1 - s is rounding only, and against a teacher tail of 0 it
// would make reverse KL infinite).
template <typename acc_t>
acc_t log_one_minus(acc_t s, bool every_class_kept) {
  return s < 1 && !every_class_kept ? std::log1p(-s) : -std::numeric_limits<acc_t>::infinity();
}

// The row's buckets against a tail: loss and stats from lse(z/T) and the
// teacher's online (max, sum) over the kept entries and the tail.
template <typename acc_t>
void forward_row_tail(const Args<acc_t>& a, int64_t row, int64_t kept, acc_t lse_s, acc_t t_max,
                      acc_t t_sum, acc_t lambda, acc_t* loss, acc_t* st) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const SparseKDLossParams& p = a.p;
  const acc_t inv_t = static_cast<acc_t>(1.0 / p.temperature);
  const BucketTerms<acc_t> terms = bucket_terms<acc_t>(p);
  // The teacher's log normalizer N over the K + 1 buckets and its mass
  // sum_b P_b; all buckets -inf leaves a renormalized row undefined (NaN).
  const acc_t lse_t = t_max + std::log(t_sum);
  const acc_t log_norm = p.renormalize ? lse_t : acc_t(0);
  const acc_t mass = p.renormalize ? (t_sum > 0 ? acc_t(1) : std::numeric_limits<acc_t>::quiet_NaN())
                                   : std::exp(lse_t);
  acc_t d = 0, ds = 0, kept_q = 0;
  for (int64_t k = 0; k < p.k; ++k) {
    const int64_t j = kept_class(a, row, k);
    if (j < 0) continue;
    const acc_t lq = load_one(a.load_s, a.student, row * a.s_row_stride + j, inv_t) - lse_s;
    const acc_t lp = load_one(a.load_t, a.logprobs, row * p.k + k, acc_t(1)) - log_norm;
    kept_q += std::exp(lq);
    terms.add(lp, lq, d, ds);
  }
  const acc_t lq_tail = log_one_minus(kept_q, kept == p.cols);
  const acc_t lp_tail = lambda - log_norm;
  terms.add(lp_tail, lq_tail, d, ds);
  const double beta = p.beta;
  const acc_t soft = p.divergence == Divergence::JSD
                         ? static_cast<acc_t>(beta) * d + static_cast<acc_t>(1 - beta) * ds : d;
  const acc_t dval = p.divergence == Divergence::JSD ? ds : d;
  loss[row] = static_cast<acc_t>(p.soft_scale) * soft;
  st[sparse_kd_loss_stats::kLseStudent] = lse_s;
  st[sparse_kd_loss_stats::kTeacherLogNormalizer] = log_norm;
  st[sparse_kd_loss_stats::kTeacherMass] = mass;
  st[sparse_kd_loss_stats::kDivergence] = p.divergence == Divergence::ForwardKL ? acc_t(0) : dval;
  if (p.divergence == Divergence::ForwardKL) {
    // Tail class j: q_j (mass - P_tail / Q_tail) = mass q_j - exp(log q_j + rho).
    st[sparse_kd_loss_stats::kDenseCoef] = mass;
    st[sparse_kd_loss_stats::kTailLogRatio] = std::exp(lp_tail) == 0 ? kNegInf : lp_tail - lq_tail;
  } else {
    // Tail class j: q_j (G_tail - Gbar); with Q_tail = 0 the tail classes carry
    // no mass: their factor is 0.
    st[sparse_kd_loss_stats::kDenseCoef] =
        lq_tail == kNegInf ? acc_t(0) : terms.bracket(lp_tail, lq_tail, dval, static_cast<acc_t>(beta));
    st[sparse_kd_loss_stats::kTailLogRatio] = kNegInf;
  }
}

template <typename acc_t>
void forward_row(const Args<acc_t>& a, int64_t row, acc_t* zb, acc_t* loss, acc_t* stats) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const SparseKDLossParams& p = a.p;
  acc_t* st = stats + row * sparse_kd_loss_stats::kCols;
  const acc_t inv_t = static_cast<acc_t>(1.0 / p.temperature);
  // Teacher side, online over the kept entries: t_sum = sum exp(l - t_max),
  // t_cross = sum exp(l - t_max) (l - z[I]/T).
  acc_t t_max = kNegInf, t_sum = 0, t_cross = 0;
  int64_t kept = 0;
  const bool live = !label_ignored(a, row);
  for (int64_t k = 0; live && k < p.k; ++k) {
    const int64_t j = kept_class(a, row, k);
    if (j < 0) continue;  // padding
    ++kept;
    const acc_t l = load_one(a.load_t, a.logprobs, row * p.k + k, acc_t(1));
    if (l == kNegInf) continue;  // zero probability: contributes nothing
    if (l > t_max) {
      if (t_max != kNegInf) {
        const acc_t f = std::exp(t_max - l);
        t_sum *= f;
        t_cross = f == 0 ? acc_t(0) : f * t_cross;
      }
      t_max = l;
    }
    const acc_t w = std::exp(l - t_max);
    const acc_t zs = load_one(a.load_s, a.student, row * a.s_row_stride + j, inv_t);
    t_sum += w;
    t_cross += w == 0 ? acc_t(0) : w * (l - zs);
  }
  if (kept == 0) {  // ignored label or all padding: a dead row
    loss[row] = 0;
    for (int64_t c = 0; c < sparse_kd_loss_stats::kCols; ++c) st[c] = 0;
    return;
  }
  const auto [s_max, s_sum] = student_lse(a, row, zb);
  const acc_t lse_s = s_max + std::log(s_sum);
  if (p.has_tail) {
    const acc_t lambda = load_one(a.load_t, a.tail, row, acc_t(1));
    if (lambda > t_max) {
      if (t_max != kNegInf) t_sum *= std::exp(t_max - lambda);
      t_max = lambda;
    }
    if (lambda != kNegInf) t_sum += std::exp(lambda - t_max);
    forward_row_tail(a, row, kept, lse_s, t_max, t_sum, lambda, loss, st);
    return;
  }
  const acc_t lse_t = t_max + std::log(t_sum);
  acc_t soft, mass;
  if (p.renormalize) {
    // sum p (l - lse_t - z/T + lse_s), the lse difference taken as (max
    // difference) + (log-sum difference) so that large lse values are not
    // rounded before they cancel. All kept l = -inf gives NaN, as the
    // reference's softmax over them does.
    soft = t_cross / t_sum + (s_max - t_max) + (std::log(s_sum) - std::log(t_sum));
    mass = t_sum / t_sum;
  } else {
    mass = std::exp(lse_t);
    soft = mass == 0 ? acc_t(0) : mass * (t_cross / t_sum + lse_s);
  }
  loss[row] = static_cast<acc_t>(p.soft_scale) * soft;
  st[sparse_kd_loss_stats::kLseStudent] = lse_s;
  st[sparse_kd_loss_stats::kTeacherLogNormalizer] = p.renormalize ? lse_t : acc_t(0);
  st[sparse_kd_loss_stats::kTeacherMass] = mass;
  st[sparse_kd_loss_stats::kDenseCoef] = mass;
  st[sparse_kd_loss_stats::kTailLogRatio] = kNegInf;
  st[sparse_kd_loss_stats::kDivergence] = 0;
}

template <typename acc_t>
void backward_row(const Args<acc_t>& a, int64_t row, const acc_t* grad_loss,
                  const acc_t* stats, TileStorer<acc_t> store_s, void* grad_s, acc_t* zb) {
  using Vec = Vectorized<acc_t>;
  const SparseKDLossParams& p = a.p;
  const acc_t* st = stats + row * sparse_kd_loss_stats::kCols;
  const int64_t s_off = row * a.s_row_stride, out_off = row * p.cols;
  const acc_t mass = st[sparse_kd_loss_stats::kTeacherMass];
  if (label_ignored(a, row) || mass == 0) {
    std::fill(zb, zb + std::min(kTile, p.cols), acc_t(0));
    for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
      store_s(zb, std::min(kTile, p.cols - j0), grad_s, out_off + j0);
    }
    return;
  }
  const acc_t inv_t = static_cast<acc_t>(1.0 / p.temperature);
  const acc_t lse_s = st[sparse_kd_loss_stats::kLseStudent];
  const acc_t log_norm = st[sparse_kd_loss_stats::kTeacherLogNormalizer];
  const acc_t rho = st[sparse_kd_loss_stats::kTailLogRatio];
  const acc_t dval = st[sparse_kd_loss_stats::kDivergence];
  const acc_t c = grad_loss[row] * static_cast<acc_t>(p.soft_scale) * inv_t;
  const Vec vcg(c * st[sparse_kd_loss_stats::kDenseCoef]), vls(lse_s);
  const bool tail_ratio = rho != -std::numeric_limits<acc_t>::infinity();
  const Vec vc(c), vlr(lse_s - rho);
  for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
    const int64_t n = std::min(kTile, p.cols - j0);
    a.load_s(a.student, s_off + j0, n, inv_t, zb);
    for (int64_t i = 0; i < n; i += Vec::size()) {
      const Vec x = Vec::loadu(zb + i);
      Vec g = vcg * vexp(x - vls);
      if (tail_ratio) g = g - vc * vexp(x - vlr);
      g.store(zb + i);
    }
    store_s(zb, n, grad_s, out_off + j0);
  }
  const BucketTerms<acc_t> terms = bucket_terms<acc_t>(p);
  const acc_t beta = static_cast<acc_t>(p.beta);
  for (int64_t k = 0; k < p.k; ++k) {
    const int64_t j = kept_class(a, row, k);
    if (j < 0) continue;
    const acc_t lp = load_one(a.load_t, a.logprobs, row * p.k + k, acc_t(1)) - log_norm;
    const acc_t lq = load_one(a.load_s, a.student, s_off + j, inv_t) - lse_s;
    const acc_t g = c * terms.grad(lp, lq, mass, dval, beta);
    store_s(&g, 1, grad_s, out_off + j);
  }
}

template <typename acc_t>
Args<acc_t> make_args(const at::Tensor& s, const at::Tensor& idx, const at::Tensor& lp,
                      const std::optional<at::Tensor>& tail,
                      const std::optional<at::Tensor>& labels, const SparseKDLossParams& p,
                      HostErrorRecord& errors) {
  Args<acc_t> a;
  a.errors = &errors;
  a.student = s.data_ptr();
  a.logprobs = lp.data_ptr();
  a.tail = tail.has_value() ? tail->data_ptr() : nullptr;
  a.indices = idx.data_ptr<int64_t>();
  a.labels = p.has_labels ? labels->data_ptr<int64_t>() : nullptr;
  a.s_row_stride = s.stride(0);
  a.load_s = loader_for<acc_t>(s.scalar_type());
  a.load_t = loader_for<acc_t>(lp.scalar_type());
  a.p = p;
  return a;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_forward_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
    double temperature, bool renormalize, int64_t ignore_index, bool scale_by_t2,
    bool check_duplicates, const std::optional<at::Tensor>& teacher_tail_logprob,
    c10::string_view divergence, double beta) {
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2, teacher_tail_logprob, divergence, beta);
  check_index_values(teacher_indices, p.cols, check_duplicates);
  const at::Tensor s = unit_stride_rows(student_logits);
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const std::optional<at::Tensor> y = contiguous_opt(labels);
  const std::optional<at::Tensor> tail = contiguous_opt(teacher_tail_logprob);
  const auto opts = s.options().dtype(acc_scalar_type(s));
  at::Tensor loss = at::empty({p.rows}, opts);
  at::Tensor stats = at::empty({p.rows, sparse_kd_loss_stats::kCols}, opts);
  HostErrorRecord errors;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "sparse_kd_loss_forward_cpu", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(s, idx, lp, tail, y, p, errors);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t zb[kTile];
      for (int64_t row = begin; row < end; ++row) forward_row(a, row, zb, loss_ptr, stats_ptr);
    });
  });
  errors.raise_if_any();
  return {loss, stats};
}

at::Tensor sparse_kd_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student_logits,
    const at::Tensor& teacher_indices, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature,
    bool renormalize, int64_t ignore_index, bool scale_by_t2,
    const std::optional<at::Tensor>& teacher_tail_logprob, c10::string_view divergence,
    double beta) {
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2, teacher_tail_logprob, divergence, beta);
  check_sparse_kd_loss_backward_args(grad_loss, stats, student_logits, p);
  const at::Tensor s = unit_stride_rows(student_logits);
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const std::optional<at::Tensor> y = contiguous_opt(labels);
  const std::optional<at::Tensor> tail = contiguous_opt(teacher_tail_logprob);
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor grad_s = empty_like_cached(s);
  HostErrorRecord errors;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_kd_loss_backward_cpu", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(s, idx, lp, tail, y, p, errors);
    const TileStorer<scalar_t> store_s = storer_for<scalar_t>(s.scalar_type());
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const scalar_t* st_ptr = st.data_ptr<scalar_t>();
    void* gs_ptr = grad_s.data_ptr();
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t zb[kTile];
      for (int64_t row = begin; row < end; ++row) {
        backward_row(a, row, g_ptr, st_ptr, store_s, gs_ptr, zb);
      }
    });
  });
  errors.raise_if_any();
  return grad_s;
}

}  // namespace
}  // namespace distillkit::cpu::inline CPU_CAPABILITY

DK_CPU_KERNEL(sparse_kd_loss_forward, sparse_kd_loss_forward_cpu)
DK_CPU_KERNEL(sparse_kd_loss_backward, sparse_kd_loss_backward_cpu)

// Registered once, by the default level's build (it runs on every CPU); each call
// goes to the chosen level's kernel.
#if defined(CPU_CAPABILITY_DEFAULT)
TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("sparse_kd_loss_forward", DK_CPU_DISPATCH(sparse_kd_loss_forward));
  m.impl("sparse_kd_loss_backward", DK_CPU_DISPATCH(sparse_kd_loss_backward));
}
#endif
