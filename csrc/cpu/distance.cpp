// CPU kernels of the KD-Zero distances (docs/math.md §7).
//  - pointwise (l1, l2, smooth_l1): one loop per op and input dtypes,
//    converting in registers; fixed chunks reduced in parallel into
//    per-chunk partials summed in chunk order (deterministic for any thread
//    count); backward recomputes d = s - t and writes both gradients at once.
//    Row-strided inputs (PointwiseRows) are read in place, walked in the
//    element order of the contiguous loop, so their sums are bitwise its.
//  - correlation (cosine, Pearson) over the middle dim of (outer, D, inner):
//    with inner == 1 a row is contiguous and is vectorized along itself; with
//    inner > 1 (features, or dim=0 "intra" Pearson) a block of consecutive
//    rows is vectorized across the rows, one contiguous run per step along D,
//    so the slab streams from memory in order. Pearson's forward is one pass
//    (Chan merges of exact per-tile moments), the backward one pass from the
//    saved per-row stats.
//  - gradients, written once and often far larger than the caches, come
//    from the output cache (output_cache.h), resident after the first step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstddef>
#include <limits>
#include <vector>

#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "cpu/vec_tiles.h"
#include "dispatch.h"
#include "distance.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using namespace cpu;

// --- pointwise ------------------------------------------------------------------

template <PointwiseOp kOp, typename acc_t>
Vectorized<acc_t> pointwise_value(Vectorized<acc_t> d) {
  using Vec = Vectorized<acc_t>;
  if constexpr (kOp == PointwiseOp::L1) return d.abs();
  if constexpr (kOp == PointwiseOp::L2) return d * d;
  const Vec ad = d.abs();
  return Vec::blendv(ad - Vec(0.5), Vec(0.5) * d * d, ad < Vec(1));
}

// g * d/dd of the pointwise value; sign(0) = 0, as PyTorch's l1/smooth_l1
// backward. A comparison is an all-ones mask, so (d > 0) & g is g or 0.
template <PointwiseOp kOp, typename acc_t>
Vectorized<acc_t> pointwise_grad(Vectorized<acc_t> d, Vectorized<acc_t> g) {
  using Vec = Vectorized<acc_t>;
  if constexpr (kOp == PointwiseOp::L2) return (g + g) * d;
  const Vec sign_g = ((d > Vec(0)) & g) - ((d < Vec(0)) & g);
  if constexpr (kOp == PointwiseOp::L1) return sign_g;
  return Vec::blendv(sign_g, g * d, d.abs() < Vec(1));
}

template <typename F>
void dispatch_pointwise_op(PointwiseOp op, F&& f) {
  switch (op) {
    case PointwiseOp::L1: f(std::integral_constant<PointwiseOp, PointwiseOp::L1>{}); break;
    case PointwiseOp::L2: f(std::integral_constant<PointwiseOp, PointwiseOp::L2>{}); break;
    default: f(std::integral_constant<PointwiseOp, PointwiseOp::SmoothL1>{});
  }
}

// Both inputs of a pointwise op, typed, with their PointwiseRows layout;
// load_from reads n <= kStep consecutive elements from sp and from tp into
// two acc_t vectors each, zero past n (d = 0 adds nothing to any op).
template <PointwiseOp kOp_, typename s_t_, typename t_t_, typename acc_t_>
struct PointwiseInputs {
  static constexpr PointwiseOp kOp = kOp_;
  using s_t = s_t_;
  using t_t = t_t_;
  using acc_t = acc_t_;
  using SIo = VecIo<s_t, acc_t>;
  using TIo = VecIo<t_t, acc_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = SIo::kStep;
  const s_t* s;
  const t_t* t;
  int64_t len, s_row, t_row;  // PointwiseRows'

  static void load_from(const s_t* sp, const t_t* tp, int64_t n, Vec& s0, Vec& s1, Vec& t0,
                        Vec& t1) {
    if (n == kStep) {
      SIo::load(sp, s0, s1);
      TIo::load(tp, t0, t1);
    } else {
      SIo::load_partial(sp, n, s0, s1);
      TIo::load_partial(tp, n, t0, t1);
    }
  }
};

// Walks contiguous inputs (PointwiseRows::flat()): element j is at j.
template <typename In>
struct FlatWalk {
  In in;
  int64_t j = 0;

  void seek(int64_t j0) { j = j0; }

  // Loads the next n <= kStep elements (load_from) and moves past them.
  void next(int64_t n, typename In::Vec& s0, typename In::Vec& s1, typename In::Vec& t0,
            typename In::Vec& t1) {
    In::load_from(in.s + j, in.t + j, n, s0, s1, t0, t1);
    j += n;
  }
};

// Walks rows: element j is column `col` of row `row`, read where it lies; a
// step within one row loads in place, one across rows is gathered first, in
// the same order, so the lanes and every sum are those of FlatWalk.
template <typename In>
struct RowWalk {
  In in;
  int64_t row = 0, col = 0;

  void seek(int64_t j0) {
    row = j0 / in.len;
    col = j0 % in.len;
  }

  void next(int64_t n, typename In::Vec& s0, typename In::Vec& s1, typename In::Vec& t0,
            typename In::Vec& t1) {
    if (col + n <= in.len) {
      In::load_from(in.s + row * in.s_row + col, in.t + row * in.t_row + col, n, s0, s1, t0, t1);
      advance(n);
      return;
    }
    alignas(64) typename In::s_t sb[In::kStep];
    alignas(64) typename In::t_t tb[In::kStep];
    for (int64_t k = 0; k < n;) {
      const int64_t m = std::min(n - k, in.len - col);
      std::copy_n(in.s + row * in.s_row + col, m, sb + k);
      std::copy_n(in.t + row * in.t_row + col, m, tb + k);
      k += m;
      advance(m);
    }
    In::load_from(sb, tb, n, s0, s1, t0, t1);
  }

  // Moves m <= len - col elements on, to the next row's start at the end.
  void advance(int64_t m) {
    col += m;
    if (col == in.len) {
      col = 0;
      ++row;
    }
  }
};

// Calls body(walk) once, walk a FlatWalk or RowWalk of PointwiseInputs<...>
// (a value; the body copies it per range of elements): the loops are
// specialized for the op, both input dtypes (converting in registers: fp64 is
// read in fp64, the fp32 family in fp32) and the layout, so contiguous inputs
// keep the flat loop.
template <typename F>
void dispatch_pointwise(const PointwiseRows& in, PointwiseOp op, F&& body) {
  dispatch_pointwise_op(op, [&](auto op_tag) {
    dispatch_input_types(in.student, "student", in.teacher, "teacher",
                         [&]<typename s_t, typename t_t>() {
      using acc_t = std::conditional_t<std::is_same_v<s_t, double>, double, float>;
      using In = PointwiseInputs<decltype(op_tag)::value, s_t, t_t, acc_t>;
      const In inputs{in.student.data_ptr<s_t>(), in.teacher.data_ptr<t_t>(), in.len, in.s_row,
                      in.t_row};
      if (in.flat()) {
        body(FlatWalk<In>{inputs});
      } else {
        body(RowWalk<In>{inputs});
      }
    });
  });
}

at::Tensor pointwise_distance_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                          c10::string_view op_name) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  const PointwiseRows rows = pointwise_rows(student, teacher);
  const int64_t numel = student.numel(), chunks = (numel + kTile - 1) / kTile;
  at::Tensor out = at::empty({}, student.options().dtype(acc_scalar_type(student)));
  dispatch_pointwise(rows, op, [&](const auto walk) {
    using In = decltype(walk.in);
    using acc_t = typename In::acc_t;
    using Vec = typename In::Vec;
    // Fixed chunks of the element order, partials summed in chunk order:
    // deterministic for any thread count and layout.
    std::vector<acc_t> partial(chunks);
    at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
      auto w = walk;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t j0 = c * kTile, n = std::min(kTile, numel - j0);
        Vec acc0(0), acc1(0), s0, s1, t0, t1;
        w.seek(j0);
        for (int64_t i = 0; i < n; i += In::kStep) {
          w.next(std::min(In::kStep, n - i), s0, s1, t0, t1);
          acc0 += pointwise_value<In::kOp>(s0 - t0);
          acc1 += pointwise_value<In::kOp>(s1 - t1);
        }
        partial[c] = reduce_sum(acc0 + acc1);
      }
    });
    acc_t total = 0;
    for (const acc_t v : partial) total += v;
    out.fill_(total);
  });
  return out;
}

// The gradients are contiguous whatever the inputs' layout.
std::tuple<at::Tensor, at::Tensor> pointwise_distance_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    c10::string_view op_name, bool teacher_grad) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  const PointwiseRows rows = pointwise_rows(student, teacher);
  const int64_t numel = student.numel();
  at::Tensor gs = empty_like_cached(student);
  at::Tensor gt = teacher_grad ? empty_like_cached(teacher) : at::empty({0}, teacher.options());
  dispatch_pointwise(rows, op, [&](const auto walk) {
    using In = decltype(walk.in);
    using Vec = typename In::Vec;
    typename In::s_t* gsp = gs.template data_ptr<typename In::s_t>();
    typename In::t_t* gtp = teacher_grad ? gt.template data_ptr<typename In::t_t>() : nullptr;
    const Vec g(grad.item<typename In::acc_t>());
    at::parallel_for(0, numel, 16 * kTile, [&](int64_t begin, int64_t end) {
      auto w = walk;
      w.seek(begin);
      Vec s0, s1, t0, t1;
      for (int64_t i = begin; i < end; i += In::kStep) {
        const int64_t n = std::min(In::kStep, end - i);
        w.next(n, s0, s1, t0, t1);
        const Vec d0 = pointwise_grad<In::kOp>(s0 - t0, g), d1 = pointwise_grad<In::kOp>(s1 - t1, g);
        if (n == In::kStep) In::SIo::store(gsp + i, d0, d1); else In::SIo::store_partial(gsp + i, n, d0, d1);
        if (teacher_grad) {
          const Vec e0 = Vec(0) - d0, e1 = Vec(0) - d1;
          if (n == In::kStep) In::TIo::store(gtp + i, e0, e1); else In::TIo::store_partial(gtp + i, n, e0, e1);
        }
      }
    });
  });
  return {gs, gt};
}

// --- correlation ----------------------------------------------------------------

// Loads elements [s0, s0 + n) of the flat student and [t0, t0 + n) of the
// flat teacher into tiles; the vector padding is set to 0 in both.
template <typename acc_t>
void load_pair(TileLoader<acc_t> ls, const void* s, TileLoader<acc_t> lt, const void* t,
               int64_t s0, int64_t t0, int64_t n, acc_t* sb, acc_t* tb) {
  ls(s, s0, n, acc_t(1), sb);
  lt(t, t0, n, acc_t(1), tb);
  for (int64_t i = n; i % Vectorized<acc_t>::size() != 0; ++i) sb[i] = tb[i] = 0;
}

// A row's stats (correlation_distance_stats), read and written in place:
// means (0 for cosine), norms of u and v, and cos(u, v) = <u, v> / (|u| |v|)
// (0 for a degenerate row). The cosine rather than <u, v>: it is in [-1, 1]
// whatever the magnitudes, where <u, v> of 1e30-scale rows overflows fp32.
template <typename acc_t>
struct Corr {
  acc_t ms, mt, nu, nv, cos;
};

template <typename acc_t>
constexpr bool corr_matches_stats_layout() {
  namespace col = correlation_distance_stats;
  constexpr size_t kSize = sizeof(acc_t);
  return sizeof(Corr<acc_t>) == col::kCols * kSize &&
         offsetof(Corr<acc_t>, ms) == col::kMeanStudent * kSize &&
         offsetof(Corr<acc_t>, mt) == col::kMeanTeacher * kSize &&
         offsetof(Corr<acc_t>, nu) == col::kNormStudent * kSize &&
         offsetof(Corr<acc_t>, nv) == col::kNormTeacher * kSize &&
         offsetof(Corr<acc_t>, cos) == col::kCosine * kSize;
}
static_assert(corr_matches_stats_layout<float>() && corr_matches_stats_layout<double>());

// A row's sums from the fast path: means, sum u^2, sum v^2, sum u v.
template <typename acc_t>
struct CorrSums {
  acc_t ms, mt, uu, vv, uv;
};

// Whether the fast path's sums hold the row's stats to their digits: they are
// finite, and each of sum u^2, sum v^2 is above both D min / eps (no square
// lost digits to underflow: their absolute errors, at most min each, are then
// below eps of the sum) and D (16 eps mean)^2 (u = s - mean is not at the
// rounding level of the mean: a constant or nearly constant row). Otherwise
// the row takes careful_stats.
template <typename acc_t>
bool sums_hold(const CorrSums<acc_t>& r, int64_t D) {
  using L = std::numeric_limits<acc_t>;
  const acc_t n = static_cast<acc_t>(D);
  auto floor = [&](acc_t mean) {
    const acc_t m = acc_t(16) * L::epsilon() * mean;
    return n * std::max(L::min() / L::epsilon(), m * m);
  };
  return std::isfinite(r.uu) && std::isfinite(r.vv) && std::isfinite(r.uv) &&
         r.uu >= floor(r.ms) && r.vv >= floor(r.mt);
}

// Norms and cosine of sums that hold; <u, v> / |u| / |v| rather than over
// |u| |v|, which can overflow.
template <typename acc_t>
Corr<acc_t> corr_from_sums(const CorrSums<acc_t>& r) {
  const acc_t nu = std::sqrt(r.uu), nv = std::sqrt(r.vv);
  return {r.ms, r.mt, nu, nv, r.uv / nu / nv};
}

// The careful path of a row's stats (both layouts), for rows whose fast sums
// do not hold (sums_hold). get(j, s, t) reads element j < D of the row.
//  1. the extremes of s and t: a row is degenerate exactly when it is constant
//     (Pearson) or zero (cosine), whatever the mean's rounding; its stats are
//     the means given (the fast path's) and zero norms and cosine;
//  2. the centred values scaled by powers of two that bring the largest to
//     [1/2, 1) (exact), summed, with the mean corrected by their own mean
//     (the corrected two-pass algorithm of Chan, Golub and LeVeque).
// A NaN or infinite input gives NaN stats, as on the fast path.
template <bool kCenter, typename acc_t, typename Get>
Corr<acc_t> careful_stats(int64_t D, acc_t ms, acc_t mt, Get&& get) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  acc_t s_lo = kInf, s_hi = -kInf, t_lo = kInf, t_hi = -kInf, probe = 0;
  for (int64_t j = 0; j < D; ++j) {
    acc_t s, t;
    get(j, s, t);
    s_lo = std::min(s_lo, s); s_hi = std::max(s_hi, s);
    t_lo = std::min(t_lo, t); t_hi = std::max(t_hi, t);
    probe += (s - s) + (t - t);  // NaN for a NaN or infinite entry
  }
  if (!kCenter) ms = mt = 0;
  if (probe != acc_t(0)) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {ms, mt, nan, nan, nan};
  }
  const bool flat_s = kCenter ? s_lo == s_hi : std::max(s_hi, -s_lo) == 0;
  const bool flat_t = kCenter ? t_lo == t_hi : std::max(t_hi, -t_lo) == 0;
  if (flat_s || flat_t) return {ms, mt, 0, 0, 0};  // degenerate: distance 1, no gradient
  int es, et;
  std::frexp(std::max(s_hi - ms, ms - s_lo), &es);
  std::frexp(std::max(t_hi - mt, mt - t_lo), &et);
  acc_t su = 0, sv = 0, uu = 0, vv = 0, uv = 0;
  for (int64_t j = 0; j < D; ++j) {
    acc_t s, t;
    get(j, s, t);
    const acc_t u = std::ldexp(s - ms, -es), v = std::ldexp(t - mt, -et);
    su += u; sv += v;
    uu += u * u; vv += v * v; uv += u * v;
  }
  if (kCenter) {
    const acc_t n = static_cast<acc_t>(D), cu = su / n, cv = sv / n;
    uu = std::max(acc_t(0), uu - cu * su);
    vv = std::max(acc_t(0), vv - cv * sv);
    uv -= cu * sv;
    ms += std::ldexp(cu, es);
    mt += std::ldexp(cv, et);
  }
  const acc_t ru = std::sqrt(uu), rv = std::sqrt(vv);
  return {ms, mt, std::ldexp(ru, es), std::ldexp(rv, et), uv / ru / rv};
}

// The weight of the distance's eps, w = |u| |v| / (|u| |v| + eps), formed
// without the product |u| |v| (which can overflow or underflow).
template <typename acc_t>
acc_t eps_weight(const Corr<acc_t>& c) {
  return acc_t(1) / (acc_t(1) + static_cast<acc_t>(kCorrelationEps) / c.nu / c.nv);
}

// 1 - <u, v> / (|u| |v| + eps) = 1 - cos w.
template <typename acc_t>
acc_t corr_distance(const Corr<acc_t>& c) {
  if (c.nu == 0 || c.nv == 0) return 1;
  return acc_t(1) - c.cos * eps_weight(c);
}

// The backward coefficients, with un = u / |u| and vn = v / |v| (entries in
// [-1, 1] whatever the magnitudes): ds = as un + bs vn, dt = at vn + bt un,
// where, from d = 1 - <u, v> / (|u| |v| + eps), for the row's gradient g,
//   as = g cos w pu, bs = -g pu, at = g cos w pv, bt = -g pv,
// pu = w / |u| = 1 / (|u| + eps / |v|) and pv = w / |v| = 1 / (|v| + eps / |u|),
// formed so (w itself underflows for tiny rows, where pu does not). All zero
// for a degenerate row.
template <typename acc_t>
struct CorrGrad {
  acc_t as, bs, at, bt, iu, iv;
  CorrGrad(const Corr<acc_t>& c, acc_t g) {
    if (c.nu == 0 || c.nv == 0) {
      as = bs = at = bt = iu = iv = 0;
      return;
    }
    const acc_t eps = static_cast<acc_t>(kCorrelationEps);
    const acc_t pu = acc_t(1) / (c.nu + eps / c.nv), pv = acc_t(1) / (c.nv + eps / c.nu);
    const acc_t gcw = g * c.cos * eps_weight(c);
    as = gcw * pu; bs = -g * pu;
    at = gcw * pv; bt = -g * pv;
    iu = acc_t(1) / c.nu; iv = acc_t(1) / c.nv;
  }
};

// s_row, t_row: the inputs' row strides when inner == 1 (rows are read in
// place, see corr_input); D otherwise (contiguous).
template <typename acc_t>
struct CorrArgs {
  const void* s;
  const void* t;
  TileLoader<acc_t> ls, lt;
  int64_t outer, D, inner, s_row, t_row;
};

template <typename acc_t>
CorrArgs<acc_t> make_corr_args(const at::Tensor& s, const at::Tensor& t) {
  return {s.data_ptr(),
          t.data_ptr(),
          loader_for<acc_t>(s.scalar_type()),
          loader_for<acc_t>(t.scalar_type()),
          s.size(0),
          s.size(1),
          s.size(2),
          s.size(2) == 1 ? s.stride(0) : s.size(1),
          s.size(2) == 1 ? t.stride(0) : s.size(1)};
}

// An input as the kernels read it: with inner == 1, rows (o, :, 0) whose
// elements are contiguous are read in place at any row stride (slices such
// as x[:, :D]); anything else is made contiguous.
at::Tensor corr_input(const at::Tensor& x) {
  return x.size(2) == 1 && (x.stride(1) == 1 || x.size(1) == 1) ? x : x.contiguous();
}

// Pearson in one pass over memory, as stable as two: a block's means and
// centred sums are exact two-pass sums over data still in L1, and blocks are
// combined with Chan et al.'s update. Written for acc_t or a vector of them
// (one independent merge per lane): `n` pairs so far, `nb` in the new block.
template <typename T, typename acc_t>
void chan_merge(acc_t n, acc_t nb, T& ms, T& mt, T& ss, T& tt, T& st, T bms, T bmt, T bss,
                T btt, T bst) {
  const acc_t total = n + nb;
  const T f(n * nb / total), w(nb / total);
  const T ds = bms - ms, dt = bmt - mt;
  ss = ss + bss + ds * ds * f;
  tt = tt + btt + dt * dt * f;
  st = st + bst + ds * dt * f;
  ms = ms + ds * w;
  mt = mt + dt * w;
}

// A contiguous row (inner == 1), vectorized along the row in tiles.
template <bool kCenter, typename acc_t>
CorrSums<acc_t> corr_row_sums(const CorrArgs<acc_t>& a, int64_t row, acc_t* sb, acc_t* tb) {
  using Vec = Vectorized<acc_t>;
  using at::vec::fmadd;
  if constexpr (!kCenter) {
    Vec uu(0), vv(0), uv(0);
    for (int64_t j0 = 0; j0 < a.D; j0 += kTile) {
      const int64_t n = std::min(kTile, a.D - j0);
      load_pair(a.ls, a.s, a.lt, a.t, row * a.s_row + j0, row * a.t_row + j0, n, sb, tb);  // zero padding
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const Vec u = Vec::loadu(sb + i), v = Vec::loadu(tb + i);
        uu = fmadd(u, u, uu); vv = fmadd(v, v, vv); uv = fmadd(u, v, uv);
      }
    }
    return {0, 0, reduce_sum(uu), reduce_sum(vv), reduce_sum(uv)};
  } else {
    // Moments of (s - ks, t - kt), ks and kt the first tile's means: then a
    // row mean far above the row's spread is not rounded into every merge.
    acc_t ks = 0, kt = 0, ms = 0, mt = 0, ss = 0, tt = 0, st = 0;
    for (int64_t j0 = 0; j0 < a.D; j0 += kTile) {
      const int64_t n = std::min(kTile, a.D - j0);
      load_pair(a.ls, a.s, a.lt, a.t, row * a.s_row + j0, row * a.t_row + j0, n, sb, tb);  // zero padding
      if (j0 == 0) {
        Vec vs(0), vt(0);
        for (int64_t i = 0; i < n; i += Vec::size()) { vs += Vec::loadu(sb + i); vt += Vec::loadu(tb + i); }
        ks = reduce_sum(vs) / n;
        kt = reduce_sum(vt) / n;
      }
      // Shift in place (the padding stays 0) while summing.
      Vec vs(0), vt(0);
      const Vec vks(ks), vkt(kt);
      const int64_t full = n / Vec::size() * Vec::size();
      for (int64_t i = 0; i < full; i += Vec::size()) {
        const Vec x = Vec::loadu(sb + i) - vks, y = Vec::loadu(tb + i) - vkt;
        x.store(sb + i); y.store(tb + i);
        vs += x; vt += y;
      }
      acc_t rs = 0, rt = 0;
      for (int64_t i = full; i < n; ++i) { rs += sb[i] -= ks; rt += tb[i] -= kt; }
      const acc_t bms = (reduce_sum(vs) + rs) / n, bmt = (reduce_sum(vt) + rt) / n;
      const Vec vms(bms), vmt(bmt);
      Vec uu(0), vv(0), uv(0);
      for (int64_t i = 0; i < full; i += Vec::size()) {
        const Vec u = Vec::loadu(sb + i) - vms, v = Vec::loadu(tb + i) - vmt;
        uu = fmadd(u, u, uu); vv = fmadd(v, v, vv); uv = fmadd(u, v, uv);
      }
      // The padded tail would be (0 - mean): take the last partial vector masked.
      if (full < n) {
        const Vec u = Vec::set(Vec(0), Vec::loadu(sb + full) - vms, n - full);
        const Vec v = Vec::set(Vec(0), Vec::loadu(tb + full) - vmt, n - full);
        uu = fmadd(u, u, uu); vv = fmadd(v, v, vv); uv = fmadd(u, v, uv);
      }
      chan_merge<acc_t, acc_t>(j0, n, ms, mt, ss, tt, st, bms, bmt, reduce_sum(uu),
                               reduce_sum(vv), reduce_sum(uv));
    }
    return {ks + ms, kt + mt, ss, tt, st};
  }
}

// A contiguous row's stats: the fast sums, or the careful path where they
// do not hold.
template <bool kCenter, typename acc_t>
Corr<acc_t> corr_row_stats(const CorrArgs<acc_t>& a, int64_t row, acc_t* sb, acc_t* tb) {
  const CorrSums<acc_t> r = corr_row_sums<kCenter>(a, row, sb, tb);
  if (sums_hold(r, a.D)) return corr_from_sums(r);
  // Element by element, a tile at a time (the fallback of rare rows).
  int64_t loaded = -1;
  return careful_stats<kCenter>(a.D, r.ms, r.mt, [&](int64_t j, acc_t& s, acc_t& t) {
    const int64_t j0 = j / kTile * kTile;
    if (j0 != loaded) {
      load_pair(a.ls, a.s, a.lt, a.t, row * a.s_row + j0, row * a.t_row + j0,
                std::min(kTile, a.D - j0), sb, tb);
      loaded = j0;
    }
    s = sb[j - j0];
    t = tb[j - j0];
  });
}

// inner > 1 (features, dim=0 Pearson): a task is a block of consecutive rows
// (columns c0 .. c0 + b of one outer index), vectorized across the rows. Each
// step along D reads one contiguous run of b values per input, so the slab
// streams from memory in order; per-row state lives in arrays of b lanes.
constexpr int64_t kMaxCols = 1024;
// Steps along D per Chan block: two kDStep x b tiles stay in L2.
constexpr int64_t kDStep = 16;

// Columns per task: long runs, but at least a few tasks per thread.
int64_t corr_cols(int64_t outer, int64_t inner) {
  int64_t cols = std::min(inner, kMaxCols);
  const int64_t want = 4 * at::get_num_threads();
  while (cols > 64 && outer * ((inner + cols - 1) / cols) < want) cols = (cols / 2 + 15) / 16 * 16;
  return cols;
}

// Calls body(o, c0, b) for every block of columns, in parallel.
template <typename F>
void for_each_col_block(int64_t outer, int64_t inner, F&& body) {
  const int64_t cols = corr_cols(outer, inner), blocks = (inner + cols - 1) / cols;
  at::parallel_for(0, outer * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task % blocks * cols;
      body(task / blocks, c0, std::min(cols, inner - c0));
    }
  });
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Per-task scratch of corr_cols_stats: two kDStep x bv tiles and 7 x bv of state.
constexpr int64_t kColsWork = 2 * kDStep + 7;

template <bool kCenter, typename acc_t>
void corr_cols_stats(const CorrArgs<acc_t>& a, int64_t o, int64_t c0, int64_t b, acc_t* work,
                     Corr<acc_t>* out) {
  using Vec = Vectorized<acc_t>;
  using at::vec::fmadd;
  const int64_t bv = round_up(b, Vec::size());
  acc_t* sb = work;                      // kDStep x bv
  acc_t* tb = sb + kDStep * bv;          // kDStep x bv
  acc_t* state = tb + kDStep * bv;       // 7 x bv: ms, mt, ss, tt, st, ks, kt
  std::fill(state, state + 7 * bv, acc_t(0));
  for (int64_t j0 = 0; j0 < a.D; j0 += kDStep) {
    const int64_t nd = std::min(kDStep, a.D - j0);
    for (int64_t j = 0; j < nd; ++j) {
      const int64_t off = (o * a.D + j0 + j) * a.inner + c0;
      a.ls(a.s, off, b, acc_t(1), sb + j * bv);
      a.lt(a.t, off, b, acc_t(1), tb + j * bv);
    }
    for (int64_t i = 0; i < bv; i += Vec::size()) {
      Vec ms = Vec::loadu(state + i), mt = Vec::loadu(state + bv + i);
      Vec ss = Vec::loadu(state + 2 * bv + i), tt = Vec::loadu(state + 3 * bv + i);
      Vec st = Vec::loadu(state + 4 * bv + i);
      if constexpr (!kCenter) {
        for (int64_t j = 0; j < nd; ++j) {
          const Vec u = Vec::loadu(sb + j * bv + i), v = Vec::loadu(tb + j * bv + i);
          ss = fmadd(u, u, ss); tt = fmadd(v, v, tt); st = fmadd(u, v, st);
        }
      } else {
        // As corr_row_stats: moments of (s - ks, t - kt), k the first block's means.
        const Vec inv(acc_t(1) / nd);
        if (j0 == 0) {
          Vec vs(0), vt(0);
          for (int64_t j = 0; j < nd; ++j) { vs += Vec::loadu(sb + j * bv + i); vt += Vec::loadu(tb + j * bv + i); }
          (vs * inv).store(state + 5 * bv + i);
          (vt * inv).store(state + 6 * bv + i);
        }
        const Vec ks = Vec::loadu(state + 5 * bv + i), kt = Vec::loadu(state + 6 * bv + i);
        Vec vs(0), vt(0);
        for (int64_t j = 0; j < nd; ++j) {
          const Vec x = Vec::loadu(sb + j * bv + i) - ks, y = Vec::loadu(tb + j * bv + i) - kt;
          x.store(sb + j * bv + i); y.store(tb + j * bv + i);
          vs += x; vt += y;
        }
        const Vec bms = vs * inv, bmt = vt * inv;
        Vec uu(0), vv(0), uv(0);
        for (int64_t j = 0; j < nd; ++j) {
          const Vec u = Vec::loadu(sb + j * bv + i) - bms, v = Vec::loadu(tb + j * bv + i) - bmt;
          uu = fmadd(u, u, uu); vv = fmadd(v, v, vv); uv = fmadd(u, v, uv);
        }
        chan_merge<Vec, acc_t>(j0, nd, ms, mt, ss, tt, st, bms, bmt, uu, vv, uv);
        ms.store(state + i); mt.store(state + bv + i);
      }
      ss.store(state + 2 * bv + i); tt.store(state + 3 * bv + i); st.store(state + 4 * bv + i);
    }
  }
  for (int64_t i = 0; i < b; ++i) {
    const CorrSums<acc_t> r{state[5 * bv + i] + state[i], state[6 * bv + i] + state[bv + i],
                            state[2 * bv + i], state[3 * bv + i], state[4 * bv + i]};
    if (sums_hold(r, a.D)) {
      out[i] = corr_from_sums(r);
      continue;
    }
    // Element by element down the column (the fallback of rare rows); a
    // loader pads its output to a whole vector.
    alignas(64) acc_t one_s[Vectorized<acc_t>::size()], one_t[Vectorized<acc_t>::size()];
    out[i] = careful_stats<kCenter>(a.D, r.ms, r.mt, [&](int64_t j, acc_t& s, acc_t& t) {
      const int64_t off = (o * a.D + j) * a.inner + c0 + i;
      a.ls(a.s, off, 1, acc_t(1), one_s);
      a.lt(a.t, off, 1, acc_t(1), one_t);
      s = one_s[0];
      t = one_t[0];
    });
  }
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, bool center) {
  check_distance_inputs(student, teacher, 3);
  const at::Tensor s = corr_input(student), t = corr_input(teacher);
  const int64_t outer = s.size(0), inner = s.size(2);
  const auto opts = s.options().dtype(acc_scalar_type(s));
  at::Tensor rows = at::empty({outer, inner}, opts);
  at::Tensor stats = at::empty({outer, inner, correlation_distance_stats::kCols}, opts);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "correlation_distance_forward_cpu", [&] {
    const auto a = make_corr_args<scalar_t>(s, t);
    scalar_t* r = rows.data_ptr<scalar_t>();
    Corr<scalar_t>* st = reinterpret_cast<Corr<scalar_t>*>(stats.data_ptr<scalar_t>());
    auto run = [&](auto center_tag) {
      constexpr bool kCenter = decltype(center_tag)::value;
      if (inner == 1) {
        at::parallel_for(0, outer, row_grain(a.D), [&](int64_t begin, int64_t end) {
          alignas(64) scalar_t sb[kTile], tb[kTile];
          for (int64_t row = begin; row < end; ++row) {
            st[row] = corr_row_stats<kCenter>(a, row, sb, tb);
            r[row] = corr_distance(st[row]);
          }
        });
      } else {
        const int64_t bv = round_up(std::min(inner, kMaxCols), Vectorized<scalar_t>::size());
        for_each_col_block(outer, inner, [&](int64_t o, int64_t c0, int64_t b) {
          thread_local std::vector<scalar_t> work;
          work.resize(kColsWork * bv);
          Corr<scalar_t>* out = st + o * inner + c0;
          corr_cols_stats<kCenter>(a, o, c0, b, work.data(), out);
          for (int64_t i = 0; i < b; ++i) r[o * inner + c0 + i] = corr_distance(out[i]);
        });
      }
    };
    if (center) run(std::true_type{}); else run(std::false_type{});
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& stats, bool center, bool teacher_grad) {
  check_distance_inputs(student, teacher, 3);
  check_correlation_distance_backward_args(grad_rows, stats, student);
  const at::Tensor s = corr_input(student), t = corr_input(teacher);
  const at::Tensor g = grad_rows.contiguous(), stc = stats.contiguous();
  const int64_t outer = s.size(0), D = s.size(1), inner = s.size(2);
  at::Tensor gs = empty_like_cached(s);
  at::Tensor gt = teacher_grad ? empty_like_cached(t) : at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "correlation_distance_backward_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto a = make_corr_args<scalar_t>(s, t);
    const auto ss = storer_for<scalar_t>(s.scalar_type()), sto = storer_for<scalar_t>(t.scalar_type());
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const Corr<scalar_t>* st = reinterpret_cast<const Corr<scalar_t>*>(stc.data_ptr<scalar_t>());
    if (inner == 1) {
      at::parallel_for(0, outer, row_grain(D), [&](int64_t begin, int64_t end) {
        alignas(64) scalar_t sb[kTile], tb[kTile];
        for (int64_t row = begin; row < end; ++row) {
          const CorrGrad<scalar_t> c(st[row], gp[row]);
          const Vec as(c.as), bs(c.bs), at(c.at), bt(c.bt), iu(c.iu), iv(c.iv);
          const Vec ms(st[row].ms), mt(st[row].mt);
          for (int64_t j0 = 0; j0 < D; j0 += kTile) {
            const int64_t n = std::min(kTile, D - j0);
            load_pair(a.ls, a.s, a.lt, a.t, row * a.s_row + j0, row * a.t_row + j0, n, sb, tb);
            for (int64_t i = 0; i < n; i += Vec::size()) {
              const Vec un = (Vec::loadu(sb + i) - ms) * iu, vn = (Vec::loadu(tb + i) - mt) * iv;
              (as * un + bs * vn).store(sb + i);
              if (teacher_grad) (at * vn + bt * un).store(tb + i);
            }
            ss(sb, n, gs.data_ptr(), row * D + j0);
            if (teacher_grad) sto(tb, n, gt.data_ptr(), row * D + j0);
          }
        }
        });
    } else {
      const int64_t bmax = round_up(std::min(inner, kMaxCols), Vec::size());
      for_each_col_block(outer, inner, [&](int64_t o, int64_t c0, int64_t b) {
        thread_local std::vector<scalar_t> work;
        work.resize(10 * bmax);
        const int64_t bv = round_up(b, Vec::size());
        scalar_t* sb = work.data();
        scalar_t* tb = sb + bv;
        scalar_t* as = tb + bv;
        scalar_t* bs = as + bv;
        scalar_t* at = bs + bv;
        scalar_t* bt = at + bv;
        scalar_t* iu = bt + bv;
        scalar_t* iv = iu + bv;
        scalar_t* ms = iv + bv;
        scalar_t* mt = ms + bv;
        for (int64_t i = 0; i < bv; ++i) {
          const int64_t k = o * inner + c0 + std::min(i, b - 1);  // padding lanes repeat the last row
          const CorrGrad<scalar_t> c(st[k], gp[k]);
          as[i] = c.as; bs[i] = c.bs; at[i] = c.at; bt[i] = c.bt; iu[i] = c.iu; iv[i] = c.iv;
          ms[i] = st[k].ms; mt[i] = st[k].mt;
        }
        for (int64_t j = 0; j < D; ++j) {
          const int64_t off = (o * D + j) * inner + c0;
          a.ls(a.s, off, b, scalar_t(1), sb);
          a.lt(a.t, off, b, scalar_t(1), tb);
          for (int64_t i = 0; i < bv; i += Vec::size()) {
            const Vec un = (Vec::loadu(sb + i) - Vec::loadu(ms + i)) * Vec::loadu(iu + i);
            const Vec vn = (Vec::loadu(tb + i) - Vec::loadu(mt + i)) * Vec::loadu(iv + i);
            (Vec::loadu(as + i) * un + Vec::loadu(bs + i) * vn).store(sb + i);
            if (teacher_grad) (Vec::loadu(at + i) * vn + Vec::loadu(bt + i) * un).store(tb + i);
          }
          ss(sb, b, gs.data_ptr(), off);
          if (teacher_grad) sto(tb, b, gt.data_ptr(), off);
        }
        });
    }
  });
  return {gs, gt};
}

}  // namespace
}  // namespace distillkit::cpu::inline CPU_CAPABILITY

DK_CPU_KERNEL(pointwise_distance_forward, pointwise_distance_forward_cpu)
DK_CPU_KERNEL(pointwise_distance_backward, pointwise_distance_backward_cpu)
DK_CPU_KERNEL(correlation_distance_forward, correlation_distance_forward_cpu)
DK_CPU_KERNEL(correlation_distance_backward, correlation_distance_backward_cpu)

// Registered once, by the default level's build (it runs on every CPU); each call
// goes to the chosen level's kernel.
#if defined(CPU_CAPABILITY_DEFAULT)
TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("pointwise_distance_forward", DK_CPU_DISPATCH(pointwise_distance_forward));
  m.impl("pointwise_distance_backward", DK_CPU_DISPATCH(pointwise_distance_backward));
  m.impl("correlation_distance_forward", DK_CPU_DISPATCH(correlation_distance_forward));
  m.impl("correlation_distance_backward", DK_CPU_DISPATCH(correlation_distance_backward));
}
#endif
