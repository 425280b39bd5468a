// CPU kernels of slam_loss (docs/math.md §5). Rows run in parallel; each thread holds
// one student row and one teacher row in acc_t buffers (L2-resident for LLM
// vocabularies), so the teacher is read from memory once per pass while the
// top-k threshold, the log-sum-exp and the sums reuse it from cache. Only the
// k members of the top-k set need the mixing formula; every other class has
// log q = log alpha + log f, so they are summed in closed form.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <vector>

#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "cpu/vec_tiles.h"
#include "cpu_value_checks.h"
#include "input_errors.h"
#include "slam_loss.h"
#include "stats_layout.h"

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using namespace cpu;

// Up to this k the threshold comes from one streaming pass keeping the k
// largest values; above it, from nth_element on a copy of the row.
constexpr int64_t kStreamingTopK = 32;

template <typename acc_t>
struct SlamArgs {
  const void* student;
  const void* teacher;
  int64_t s_row_stride;
  int64_t t_row_stride;
  const acc_t* alpha;
  const int64_t* k;
  TileLoader<acc_t> load_s;
  TileLoader<acc_t> load_t;
  SlamLossParams p;
};

// Per-thread row buffers, sized to whole vectors.
template <typename acc_t>
struct RowBuffers {
  std::vector<acc_t> z, t, work;
  explicit RowBuffers(int64_t cols) {
    const int64_t n = (cols + Vectorized<acc_t>::size() - 1) / Vectorized<acc_t>::size() *
                      Vectorized<acc_t>::size();
    z.resize(std::max<int64_t>(n, Vectorized<acc_t>::size()));
    t.resize(z.size());
  }
};

template <typename acc_t>
int64_t padded(int64_t cols) {
  return (cols + Vectorized<acc_t>::size() - 1) / Vectorized<acc_t>::size() *
         Vectorized<acc_t>::size();
}

// Loads row `row` of both inputs; the teacher's vector padding is set to 0
// (probability zero: outside every sum and never above a threshold >= 0).
template <typename acc_t>
void load_row(const SlamArgs<acc_t>& a, int64_t row, RowBuffers<acc_t>& b) {
  const int64_t C = a.p.cols;
  for (int64_t j0 = 0; j0 < C; j0 += kTile) {
    const int64_t n = std::min(kTile, C - j0);
    a.load_s(a.student, row * a.s_row_stride + j0, n, acc_t(1), b.z.data() + j0);
    a.load_t(a.teacher, row * a.t_row_stride + j0, n, acc_t(1), b.t.data() + j0);
  }
  std::fill(b.t.begin() + C, b.t.begin() + padded<acc_t>(C), acc_t(0));
}

// The k-th largest value of t[0:C] (with multiplicity).
template <typename acc_t>
acc_t kth_largest(const acc_t* t, int64_t C, int64_t k, std::vector<acc_t>& work) {
  if (k > kStreamingTopK) {
    work.assign(t, t + C);
    std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<acc_t>());
    return work[k - 1];
  }
  acc_t top[kStreamingTopK];
  for (int64_t i = 0; i < k; ++i) top[i] = t[i];
  acc_t* low = std::min_element(top, top + k);
  using Vec = Vectorized<acc_t>;
  int64_t i = k;
  // Once k values are held, only a value above the smallest one changes the
  // set; a whole vector below it is skipped with one compare.
  for (; i < C; ++i) {
    if (i % Vec::size() == 0 && i + Vec::size() <= C) {
      const Vec above = Vec::loadu(t + i) > Vec(*low);
      if (above.zero_mask() == (1 << Vec::size()) - 1) {
        i += Vec::size() - 1;
        continue;
      }
    }
    if (t[i] > *low) {
      *low = t[i];
      low = std::min_element(top, top + k);
    }
  }
  return *low;
}

// Visits every class with t_i >= thr in index order, saying whether it is a
// member of the top-k set: t_i > thr, or one of the first `ties` indices with
// t_i == thr (ties go to the lower class index). Classes below thr are never
// members and are skipped a vector at a time.
template <typename acc_t, typename F>
void for_each_candidate(const acc_t* t, int64_t C, acc_t thr, int64_t ties, F&& visit) {
  using Vec = Vectorized<acc_t>;
  int64_t taken = 0;
  for (int64_t i0 = 0; i0 < C; i0 += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), C - i0);
    if (n == Vec::size() && (Vec::loadu(t + i0) >= Vec(thr)).zero_mask() == (1 << n) - 1) {
      continue;
    }
    for (int64_t i = i0; i < i0 + n; ++i) {
      if (t[i] > thr) {
        visit(i, true);
      } else if (t[i] == thr) {
        visit(i, taken < ties);
        ++taken;
      }
    }
  }
}

// The mixing constants of a row: c (1 or 1/(k-1)), b = (1 - alpha) c, a = alpha - b.
template <typename acc_t>
struct Mix {
  acc_t alpha, b, a, c, one_minus_alpha, one_minus_c;
  Mix(acc_t alpha_, int64_t k, bool normalized) : alpha(alpha_) {
    c = normalized ? acc_t(1) / static_cast<acc_t>(k - 1) : acc_t(1);
    one_minus_alpha = acc_t(1) - alpha;
    one_minus_c = acc_t(1) - c;
    b = one_minus_alpha * c;
    a = alpha - b;
  }
  // log q_i and h_i / t_i (= -f a / q) of a member with log f_i = log_f.
  std::pair<acc_t, acc_t> member(acc_t log_f) const {
    const acc_t f = std::exp(log_f);
    if (b == acc_t(0)) return {std::log(alpha) + log_f, acc_t(-1)};  // q = alpha f exactly
    // q = alpha f + b (1 - f): two non-negative terms, with 1 - f = -expm1(log f)
    // exact when f is near 1 (b + a f would cancel), and q >= min(b, alpha) > 0.
    // Near q = 1 (a small loss), log q = log1p(-(1 - q)), with 1 - q = (1 - alpha)
    // ((1 - c) + c f) + alpha (1 - f) also a sum of non-negative terms (c <= 1):
    // log(q) of the rounded q would carry eps absolute, not relative, error.
    const acc_t one_minus_f = -std::expm1(log_f);
    const acc_t q = alpha * f + b * one_minus_f;
    const acc_t log_q =
        q < acc_t(0.5)
            ? std::log(q)
            : std::log1p(-(one_minus_alpha * (one_minus_c + c * f) + alpha * one_minus_f));
    return {log_q, -f * a / q};
  }
};

// lse(z) as its two parts, m = max z and ls = log sum exp(z - m): log f_i is
// then (z_i - m) - ls, where z_i - m is exact near the maximum (Sterbenz), so
// log f keeps its digits for logits far from 0 (1e4 and above), which the
// rounded sum m + ls would give up (eps |lse| absolute, in every log f). And
// ls = log1p(s') with s' = sum exp(z - m) - 1 summed without the maximum's 1:
// a confident row (f_max near 1) keeps 1 - f_max = -expm1(-ls) to its digits,
// which log(1 + s') would round away.
template <typename acc_t>
struct RowLse {
  acc_t m, ls;
  acc_t log_f(acc_t z) const { return (z - m) - ls; }
};

// z's vector padding is -inf (load_tile): it adds nothing to the max or the sum.
template <typename acc_t>
RowLse<acc_t> row_lse(const acc_t* z, int64_t C) {
  using Vec = Vectorized<acc_t>;
  const int64_t n = padded<acc_t>(C);
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < n; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(z + i));
  const acc_t m = reduce_max(vmax);
  if (m == -std::numeric_limits<acc_t>::infinity()) return {m, acc_t(0)};
  // The entries equal to m add exactly 1 each: counted, not summed.
  Vec vsum(0), vtop(0);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const Vec zv = Vec::loadu(z + i), top = zv == Vec(m);
    vsum += Vec::blendv(vexp(zv - Vec(m)), Vec(0), top);
    vtop += Vec::blendv(Vec(0), Vec(1), top);
  }
  return {m, std::log1p(reduce_sum(vsum) + (reduce_sum(vtop) - acc_t(1)))};
}

template <typename acc_t>
acc_t slam_forward_row(const SlamArgs<acc_t>& a, int64_t row, RowBuffers<acc_t>& b,
                       acc_t* stats) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = a.p.cols, n = padded<acc_t>(C), k = a.k[row];
  load_row(a, row, b);
  const acc_t* z = b.z.data();
  const acc_t* t = b.t.data();
  const int64_t yhat = std::max_element(t, t + C) - t;  // the first maximum
  const acc_t thr = kth_largest(t, C, k, b.work);
  const RowLse<acc_t> lse = row_lse(z, C);
  // Vectorized sums over the classes below the threshold (never members);
  // classes at or above it are visited one by one below. The count of
  // classes above it is taken per chunk of kCountChunk columns, whose lane
  // counts are exact in acc_t, and summed as an integer.
  constexpr int64_t kCountChunk = int64_t{1} << 20;
  int64_t greater = 0;
  // vrest_tz sums t (z - m) <= 0: terms of one sign (no cancellation, unlike
  // t z and t lse summed apart), and those of the loss are all >= 0 below.
  const Vec vm(lse.m);
  Vec vrest_t(0), vrest_tz(0);
  for (int64_t c0 = 0; c0 < n; c0 += kCountChunk) {
    Vec vgreater(0);
    for (int64_t i = c0; i < std::min(n, c0 + kCountChunk); i += Vec::size()) {
      const Vec tv = Vec::loadu(t + i);
      vgreater += Vec::blendv(Vec(0), Vec(1), tv > Vec(thr));
      const Vec below = Vec::blendv(Vec(0), tv, tv < Vec(thr));
      vrest_t += below;
      vrest_tz += masked_term(below, Vec::loadu(z + i) - vm);
    }
    greater += static_cast<int64_t>(reduce_sum(vgreater));
  }
  const int64_t ties = k - greater;
  const Mix<acc_t> mix(a.alpha[row], k, a.p.normalized);
  acc_t loss, s, t_sum;
  if (a.p.hard) {
    const auto [log_q, h_over_t] = mix.member(lse.log_f(z[yhat]));
    loss = -log_q;
    s = h_over_t;
    t_sum = 1;
  } else {
    // Members: their exact log q; everyone else: log alpha + (z - m) - ls,
    // summed in closed form. Scalar sums over up to C candidates accumulate in
    // double.
    double rest_t = reduce_sum(vrest_t), rest_tz = reduce_sum(vrest_tz);
    double m_t = 0, m_tlogq = 0, m_h = 0;
    for_each_candidate(t, C, thr, ties, [&](int64_t i, bool member) {
      if (t[i] == acc_t(0)) return;  // xlogy: 0 log q = 0
      if (!member) {
        rest_t += t[i];
        rest_tz += static_cast<double>(t[i]) * (z[i] - lse.m);
        return;
      }
      const auto [log_q, h_over_t] = mix.member(lse.log_f(z[i]));
      m_t += t[i];
      m_tlogq += static_cast<double>(t[i]) * log_q;
      m_h += static_cast<double>(t[i]) * h_over_t;
    });
    loss = static_cast<acc_t>(
        rest_t * (static_cast<double>(lse.ls) - std::log(static_cast<double>(mix.alpha))) -
        rest_tz - m_tlogq);
    s = static_cast<acc_t>(-rest_t + m_h);
    t_sum = static_cast<acc_t>(rest_t + m_t);
  }
  acc_t* st = stats + row * slam_loss_stats::kCols;
  st[slam_loss_stats::kMaxStudent] = lse.m;
  st[slam_loss_stats::kLogSumStudent] = lse.ls;
  st[slam_loss_stats::kThreshold] = thr;
  st[slam_loss_stats::kTies] = int_stat<acc_t>(ties);
  st[slam_loss_stats::kTeacherArgmax] = int_stat<acc_t>(yhat);
  st[slam_loss_stats::kTeacherMass] = t_sum;
  st[slam_loss_stats::kHSum] = s;
  return loss;
}

// The backward trusts nothing it did not compute: yhat, read back from the
// stats, must name a class, and k and alpha (which may have changed since
// the forward) must be in range; else the error is recorded and the row's
// gradient is zero. The saved tie count only counts (no index comes from it).
template <typename acc_t>
void slam_backward_row(const SlamArgs<acc_t>& a, int64_t row, acc_t g, const acc_t* stats,
                       RowBuffers<acc_t>& b, TileStorer<acc_t> store, void* grad,
                       HostErrorRecord& errors) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = a.p.cols, n = padded<acc_t>(C), k = a.k[row];
  const acc_t* st = stats + row * slam_loss_stats::kCols;
  const int64_t yhat = stat_int(st[slam_loss_stats::kTeacherArgmax]);
  const int64_t k_min = a.p.normalized ? 2 : 1;
  const acc_t alpha = a.alpha[row];
  const bool bad_yhat = a.p.hard && (yhat < 0 || yhat >= C);
  const bool bad_k = k < k_min || k > C;
  const bool bad_alpha = !(alpha > 0 && alpha <= 1);
  if (bad_yhat) {
    errors.record(InputError::kStatsIndex, row, slam_loss_stats::kTeacherArgmax, yhat, C);
  }
  if (bad_k) errors.record(InputError::kK, row, -1, k, C, k_min);
  if (bad_alpha) errors.record(InputError::kAlpha, row, -1, double_bits(alpha), 0);
  if (bad_yhat || bad_k || bad_alpha) {
    std::fill(b.z.begin(), b.z.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < C; j0 += kTile) {
      store(b.z.data() + j0, std::min(kTile, C - j0), grad, row * C + j0);
    }
    return;
  }
  load_row(a, row, b);
  acc_t* z = b.z.data();
  const acc_t* t = b.t.data();
  const RowLse<acc_t> lse{st[slam_loss_stats::kMaxStudent], st[slam_loss_stats::kLogSumStudent]};
  const acc_t s = st[slam_loss_stats::kHSum];
  const Mix<acc_t> mix(a.alpha[row], k, a.p.normalized);
  // Members' gradients need the logits, so they are computed before the
  // vectorized pass overwrites z with dz.
  std::vector<std::pair<int64_t, acc_t>> members;
  auto member_grad = [&](int64_t i, acc_t t_i) {
    const acc_t log_f = lse.log_f(z[i]);
    const acc_t h = t_i * mix.member(log_f).second;
    members.emplace_back(i, g * (h - std::exp(log_f) * s));
  };
  if (a.p.hard) {
    member_grad(yhat, acc_t(1));
  } else {
    const acc_t thr = st[slam_loss_stats::kThreshold];
    const int64_t ties = stat_int(st[slam_loss_stats::kTies]);
    for_each_candidate(t, C, thr, ties, [&](int64_t i, bool member) {
      if (member) member_grad(i, t[i]);
    });
  }
  // Non-members: h_j = -t_j (0 in hard mode).
  const Vec vg(g), vs(s), vm(lse.m), vls(lse.ls), tscale(a.p.hard ? acc_t(0) : acc_t(1));
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const Vec f = vexp((Vec::loadu(z + i) - vm) - vls);
    (vg * (Vec(0) - tscale * Vec::loadu(t + i) - f * vs)).store(z + i);
  }
  for (const auto& [i, dz] : members) z[i] = dz;
  for (int64_t j0 = 0; j0 < C; j0 += kTile) {
    store(z + j0, std::min(kTile, C - j0), grad, row * C + j0);
  }
}

template <typename acc_t>
SlamArgs<acc_t> make_slam_args(const at::Tensor& s, const at::Tensor& t, const at::Tensor& alpha,
                               const at::Tensor& k, const SlamLossParams& p) {
  return SlamArgs<acc_t>{s.data_ptr(), t.data_ptr(), s.stride(0), t.stride(0),
                         alpha.data_ptr<acc_t>(), k.data_ptr<int64_t>(),
                         loader_for<acc_t>(s.scalar_type()), loader_for<acc_t>(t.scalar_type()),
                         p};
}

std::tuple<at::Tensor, at::Tensor> slam_loss_forward_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_probs, const at::Tensor& alpha,
    const at::Tensor& k, bool normalized, bool hard) {
  const SlamLossParams p = check_slam_loss_args(student_logits, teacher_probs, alpha, k,
                                               normalized, hard);
  check_slam_values(teacher_probs, alpha, k, normalized);
  const at::Tensor s = unit_stride_rows(student_logits), t = unit_stride_rows(teacher_probs);
  const at::Tensor al = alpha.contiguous(), kk = k.contiguous();
  at::Tensor loss = at::empty({p.rows}, al.options());
  at::Tensor stats = at::empty({p.rows, slam_loss_stats::kCols}, al.options());
  AT_DISPATCH_FLOATING_TYPES(al.scalar_type(), "slam_loss_forward_cpu", [&] {
    const auto a = make_slam_args<scalar_t>(s, t, al, kk, p);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    scalar_t* stats_ptr = stats.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      RowBuffers<scalar_t> buf(p.cols);
      for (int64_t row = begin; row < end; ++row) {
        loss_ptr[row] = slam_forward_row(a, row, buf, stats_ptr);
      }
    });
  });
  return {loss, stats};
}

at::Tensor slam_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                  const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                  const at::Tensor& k, const at::Tensor& stats, bool normalized,
                                  bool hard) {
  const SlamLossParams p = check_slam_loss_args(student_logits, teacher_probs, alpha, k,
                                               normalized, hard);
  check_slam_loss_backward_args(grad_loss, stats, student_logits, p);
  const at::Tensor s = unit_stride_rows(student_logits), t = unit_stride_rows(teacher_probs);
  const at::Tensor al = alpha.contiguous(), kk = k.contiguous();
  const at::Tensor g = grad_loss.contiguous(), st = stats.contiguous();
  at::Tensor grad = empty_like_cached(s);
  HostErrorRecord errors;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "slam_loss_backward_cpu", [&] {
    const auto a = make_slam_args<scalar_t>(s, t, al, kk, p);
    const TileStorer<scalar_t> store = storer_for<scalar_t>(s.scalar_type());
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const scalar_t* st_ptr = st.data_ptr<scalar_t>();
    void* out = grad.data_ptr();
    at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
      RowBuffers<scalar_t> buf(p.cols);
      for (int64_t row = begin; row < end; ++row) {
        slam_backward_row(a, row, g_ptr[row], st_ptr, buf, store, out, errors);
      }
    });
  });
  errors.raise_if_any();
  return grad;
}

}  // namespace
}  // namespace distillkit::cpu::inline CPU_CAPABILITY

DK_CPU_KERNEL(slam_loss_forward, slam_loss_forward_cpu)
DK_CPU_KERNEL(slam_loss_backward, slam_loss_backward_cpu)

// Registered once, by the default level's build (it runs on every CPU); each call
// goes to the chosen level's kernel.
#if defined(CPU_CAPABILITY_DEFAULT)
TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("slam_loss_forward", DK_CPU_DISPATCH(slam_loss_forward));
  m.impl("slam_loss_backward", DK_CPU_DISPATCH(slam_loss_backward));
}
#endif
