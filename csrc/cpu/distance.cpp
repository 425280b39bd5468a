// CPU kernels of the KD-Zero distances (SPEC §6).
//  - pointwise (l1, l2, smooth_l1): fixed chunks reduced in parallel into
//    per-chunk partials summed in chunk order (deterministic for any thread
//    count); backward recomputes d = s - t and writes both gradients at once.
//  - correlation (cosine, Pearson) over the middle dim of (outer, D, inner):
//    with inner == 1 a row is contiguous and is vectorized along itself; with
//    inner > 1 (features, or dim=0 "intra" Pearson) a block of consecutive
//    rows shares each contiguous span, so the loop runs along D over spans and
//    every load is a contiguous, cache-line-sized read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec_tiles.h"
#include "distance.h"
#include "kd_loss.h"

namespace distillkit {
namespace {

using namespace cpu;

// --- pointwise ------------------------------------------------------------------

template <typename acc_t>
Vectorized<acc_t> pointwise_value(PointwiseOp op, Vectorized<acc_t> d) {
  using Vec = Vectorized<acc_t>;
  const Vec ad = d.abs();
  switch (op) {
    case PointwiseOp::L1: return ad;
    case PointwiseOp::L2: return d * d;
    default: return Vec::blendv(ad - Vec(0.5), Vec(0.5) * d * d, ad < Vec(1));
  }
}

// d/dd of the pointwise value; sign(0) = 0, as PyTorch's l1/smooth_l1 backward.
template <typename acc_t>
Vectorized<acc_t> pointwise_grad(PointwiseOp op, Vectorized<acc_t> d) {
  using Vec = Vectorized<acc_t>;
  if (op == PointwiseOp::L2) return Vec(2) * d;
  const Vec sign = Vec::blendv(Vec::blendv(Vec(0), Vec(1), d > Vec(0)), Vec(-1), d < Vec(0));
  if (op == PointwiseOp::L1) return sign;
  return Vec::blendv(sign, d, d.abs() < Vec(1));
}

// Loads elements [j0, j0 + n) of both flat inputs; the vector padding is set
// to 0 in both, so it contributes d = 0 to every pointwise op.
template <typename acc_t>
void load_pair(TileLoader<acc_t> ls, const void* s, TileLoader<acc_t> lt, const void* t,
               int64_t j0, int64_t n, acc_t* sb, acc_t* tb) {
  ls(s, j0, n, acc_t(1), sb);
  lt(t, j0, n, acc_t(1), tb);
  for (int64_t i = n; i % Vectorized<acc_t>::size() != 0; ++i) sb[i] = tb[i] = 0;
}

at::Tensor pointwise_distance_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                          c10::string_view op_name) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t numel = s.numel(), chunks = (numel + kTile - 1) / kTile;
  at::Tensor out = at::empty({}, s.options().dtype(kd_loss_acc_type(s)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "pointwise_distance_forward_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto ls = loader_for<scalar_t>(s.scalar_type()), lt = loader_for<scalar_t>(t.scalar_type());
    std::vector<scalar_t> partial(chunks);
    at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t sb[kTile], tb[kTile];
      for (int64_t c = begin; c < end; ++c) {
        const int64_t n = std::min(kTile, numel - c * kTile);
        load_pair(ls, s.data_ptr(), lt, t.data_ptr(), c * kTile, n, sb, tb);
        Vec acc(0);
        for (int64_t i = 0; i < n; i += Vec::size()) {
          acc += pointwise_value(op, Vec::loadu(sb + i) - Vec::loadu(tb + i));
        }
        partial[c] = reduce_sum(acc);
      }
    });
    scalar_t total = 0;
    for (const scalar_t v : partial) total += v;
    out.fill_(total);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pointwise_distance_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    c10::string_view op_name, bool teacher_grad) {
  check_distance_inputs(student, teacher, -1);
  const PointwiseOp op = parse_pointwise_op(op_name);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t numel = s.numel(), chunks = (numel + kTile - 1) / kTile;
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(kd_loss_acc_type(s), "pointwise_distance_backward_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto ls = loader_for<scalar_t>(s.scalar_type()), lt = loader_for<scalar_t>(t.scalar_type());
    const auto ss = storer_for<scalar_t>(s.scalar_type()), st = storer_for<scalar_t>(t.scalar_type());
    const Vec g(grad.item<scalar_t>());
    at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
      alignas(64) scalar_t sb[kTile], tb[kTile];
      for (int64_t c = begin; c < end; ++c) {
        const int64_t n = std::min(kTile, numel - c * kTile);
        load_pair(ls, s.data_ptr(), lt, t.data_ptr(), c * kTile, n, sb, tb);
        for (int64_t i = 0; i < n; i += Vec::size()) {
          const Vec ds = g * pointwise_grad(op, Vec::loadu(sb + i) - Vec::loadu(tb + i));
          ds.store(sb + i);
          (Vec(0) - ds).store(tb + i);
        }
        ss(sb, n, gs.data_ptr(), c * kTile);
        if (teacher_grad) st(tb, n, gt.data_ptr(), c * kTile);
      }
    });
  });
  return {gs, gt};
}

// --- correlation ----------------------------------------------------------------

// Per-row sums of the two passes, for a block of up to kBlock rows.
constexpr int64_t kBlock = 16;

template <typename acc_t>
struct Corr {
  acc_t ms, mt, nu, nv, dot;
};

// 1 - rho and the backward coefficients: ds = g (a_s v + b_s u), dt = g (a_t u + b_t v).
template <typename acc_t>
struct CorrGrad {
  acc_t a, bs, bt;
  explicit CorrGrad(const Corr<acc_t>& c) {
    if (c.nu == 0 || c.nv == 0) {
      a = bs = bt = 0;
      return;
    }
    const acc_t den = c.nu * c.nv + static_cast<acc_t>(kCorrelationEps);
    a = -acc_t(1) / den;
    bs = c.dot * c.nv / (c.nu * den * den);
    bt = c.dot * c.nu / (c.nv * den * den);
  }
};

template <typename acc_t>
acc_t corr_distance(const Corr<acc_t>& c) {
  if (c.nu == 0 || c.nv == 0) return 1;
  return acc_t(1) - c.dot / (c.nu * c.nv + static_cast<acc_t>(kCorrelationEps));
}

template <typename acc_t>
struct CorrArgs {
  const void* s;
  const void* t;
  TileLoader<acc_t> ls, lt;
  int64_t outer, D, inner;
  bool center;
};

// Streams the (o, :, i0 : i0 + b) block of both inputs, calling
// visit(j, s_span, t_span) for each j with spans of b contiguous values.
template <typename acc_t, typename F>
void for_each_span(const CorrArgs<acc_t>& a, int64_t o, int64_t i0, int64_t b, F&& visit) {
  alignas(64) acc_t sb[kBlock], tb[kBlock];
  for (int64_t j = 0; j < a.D; ++j) {
    const int64_t off = (o * a.D + j) * a.inner + i0;
    a.ls(a.s, off, b, acc_t(1), sb);
    a.lt(a.t, off, b, acc_t(1), tb);
    visit(j, sb, tb);
  }
}

// Two passes (means, then centred products) avoid the cancellation of
// sum(s^2) - D mean^2.
template <typename acc_t>
void corr_block_stats(const CorrArgs<acc_t>& a, int64_t o, int64_t i0, int64_t b,
                      Corr<acc_t>* out) {
  acc_t ms[kBlock] = {}, mt[kBlock] = {}, uu[kBlock] = {}, vv[kBlock] = {}, uv[kBlock] = {};
  if (a.center) {
    for_each_span(a, o, i0, b, [&](int64_t, const acc_t* s, const acc_t* t) {
      for (int64_t i = 0; i < b; ++i) { ms[i] += s[i]; mt[i] += t[i]; }
    });
    for (int64_t i = 0; i < b; ++i) { ms[i] /= a.D; mt[i] /= a.D; }
  }
  for_each_span(a, o, i0, b, [&](int64_t, const acc_t* s, const acc_t* t) {
    for (int64_t i = 0; i < b; ++i) {
      const acc_t u = s[i] - ms[i], v = t[i] - mt[i];
      uu[i] += u * u; vv[i] += v * v; uv[i] += u * v;
    }
  });
  for (int64_t i = 0; i < b; ++i) out[i] = {ms[i], mt[i], std::sqrt(uu[i]), std::sqrt(vv[i]), uv[i]};
}

// A contiguous row (inner == 1), vectorized along the row in tiles.
template <typename acc_t>
Corr<acc_t> corr_row_stats(const CorrArgs<acc_t>& a, int64_t row, acc_t* sb, acc_t* tb) {
  using Vec = Vectorized<acc_t>;
  acc_t ms = 0, mt = 0;
  auto tiles = [&](auto&& body) {
    for (int64_t j0 = 0; j0 < a.D; j0 += kTile) {
      const int64_t n = std::min(kTile, a.D - j0);
      load_pair(a.ls, a.s, a.lt, a.t, row * a.D + j0, n, sb, tb);
      body(n);
    }
  };
  if (a.center) {
    Vec vs(0), vt(0);
    tiles([&](int64_t n) {
      for (int64_t i = 0; i < n; i += Vec::size()) { vs += Vec::loadu(sb + i); vt += Vec::loadu(tb + i); }
    });
    ms = reduce_sum(vs) / a.D;
    mt = reduce_sum(vt) / a.D;
  }
  Vec uu(0), vv(0), uv(0);
  const Vec vms(ms), vmt(mt);
  tiles([&](int64_t n) {
    const int64_t full = n / Vec::size() * Vec::size();
    for (int64_t i = 0; i < full; i += Vec::size()) {
      const Vec u = Vec::loadu(sb + i) - vms, v = Vec::loadu(tb + i) - vmt;
      uu += u * u; vv += v * v; uv += u * v;
    }
    // The padded tail would be (0 - mean): take the last partial vector masked.
    if (full < n) {
      const Vec u = Vec::set(Vec(0), Vec::loadu(sb + full) - vms, n - full);
      const Vec v = Vec::set(Vec(0), Vec::loadu(tb + full) - vmt, n - full);
      uu += u * u; vv += v * v; uv += u * v;
    }
  });
  return {ms, mt, std::sqrt(reduce_sum(uu)), std::sqrt(reduce_sum(vv)), reduce_sum(uv)};
}

template <typename acc_t>
CorrArgs<acc_t> make_corr_args(const at::Tensor& s, const at::Tensor& t, bool center) {
  return {s.data_ptr(), t.data_ptr(), loader_for<acc_t>(s.scalar_type()),
          loader_for<acc_t>(t.scalar_type()), s.size(0), s.size(1), s.size(2), center};
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, bool center) {
  check_distance_inputs(student, teacher, 3);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t outer = s.size(0), inner = s.size(2);
  const auto opts = s.options().dtype(kd_loss_acc_type(s));
  at::Tensor rows = at::empty({outer, inner}, opts);
  at::Tensor stats = at::empty({outer, inner, kCorrelationStats}, opts);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "correlation_distance_forward_cpu", [&] {
    const auto a = make_corr_args<scalar_t>(s, t, center);
    scalar_t* r = rows.data_ptr<scalar_t>();
    Corr<scalar_t>* st = reinterpret_cast<Corr<scalar_t>*>(stats.data_ptr<scalar_t>());
    if (inner == 1) {
      at::parallel_for(0, outer, row_grain(a.D), [&](int64_t begin, int64_t end) {
        alignas(64) scalar_t sb[kTile], tb[kTile];
        for (int64_t row = begin; row < end; ++row) {
          st[row] = corr_row_stats(a, row, sb, tb);
          r[row] = corr_distance(st[row]);
        }
      });
    } else {
      const int64_t blocks = (inner + kBlock - 1) / kBlock;
      at::parallel_for(0, outer * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o = task / blocks, i0 = task % blocks * kBlock;
          const int64_t b = std::min(kBlock, inner - i0);
          Corr<scalar_t>* out = st + o * inner + i0;
          corr_block_stats(a, o, i0, b, out);
          for (int64_t i = 0; i < b; ++i) r[o * inner + i0 + i] = corr_distance(out[i]);
        }
      });
    }
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> correlation_distance_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& stats, bool center, bool teacher_grad) {
  check_distance_inputs(student, teacher, 3);
  check_correlation_backward_args(grad_rows, stats, student);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor g = grad_rows.contiguous(), stc = stats.contiguous();
  const int64_t outer = s.size(0), D = s.size(1), inner = s.size(2);
  at::Tensor gs = at::empty_like(s);
  at::Tensor gt = teacher_grad ? at::empty_like(t) : at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "correlation_distance_backward_cpu", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto a = make_corr_args<scalar_t>(s, t, center);
    const auto ss = storer_for<scalar_t>(s.scalar_type()), sto = storer_for<scalar_t>(t.scalar_type());
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const Corr<scalar_t>* st = reinterpret_cast<const Corr<scalar_t>*>(stc.data_ptr<scalar_t>());
    const int64_t blocks = (inner + kBlock - 1) / kBlock;
    if (inner == 1) {
      at::parallel_for(0, outer, row_grain(D), [&](int64_t begin, int64_t end) {
        alignas(64) scalar_t sb[kTile], tb[kTile];
        for (int64_t row = begin; row < end; ++row) {
          const CorrGrad<scalar_t> c(st[row]);
          const scalar_t gr = gp[row];
          const Vec as(gr * c.a), bs(gr * c.bs), bt(gr * c.bt), ms(st[row].ms), mt(st[row].mt);
          for (int64_t j0 = 0; j0 < D; j0 += kTile) {
            const int64_t n = std::min(kTile, D - j0);
            load_pair(a.ls, a.s, a.lt, a.t, row * D + j0, n, sb, tb);
            for (int64_t i = 0; i < n; i += Vec::size()) {
              const Vec u = Vec::loadu(sb + i) - ms, v = Vec::loadu(tb + i) - mt;
              (as * v + bs * u).store(sb + i);
              (as * u + bt * v).store(tb + i);
            }
            ss(sb, n, gs.data_ptr(), row * D + j0);
            if (teacher_grad) sto(tb, n, gt.data_ptr(), row * D + j0);
          }
        }
      });
    } else {
      at::parallel_for(0, outer * blocks, 1, [&](int64_t begin, int64_t end) {
        alignas(64) scalar_t ds[kBlock], dt[kBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o = task / blocks, i0 = task % blocks * kBlock;
          const int64_t b = std::min(kBlock, inner - i0);
          scalar_t as[kBlock], bs[kBlock], bt[kBlock];
          for (int64_t i = 0; i < b; ++i) {
            const CorrGrad<scalar_t> c(st[o * inner + i0 + i]);
            const scalar_t gr = gp[o * inner + i0 + i];
            as[i] = gr * c.a; bs[i] = gr * c.bs; bt[i] = gr * c.bt;
          }
          const Corr<scalar_t>* cs = st + o * inner + i0;
          for_each_span(a, o, i0, b, [&](int64_t j, const scalar_t* sv, const scalar_t* tv) {
            for (int64_t i = 0; i < b; ++i) {
              const scalar_t u = sv[i] - cs[i].ms, v = tv[i] - cs[i].mt;
              ds[i] = as[i] * v + bs[i] * u;
              dt[i] = as[i] * u + bt[i] * v;
            }
            const int64_t off = (o * D + j) * inner + i0;
            ss(ds, b, gs.data_ptr(), off);
            if (teacher_grad) sto(dt, b, gt.data_ptr(), off);
          });
        }
      });
    }
  });
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("pointwise_distance_forward", &pointwise_distance_forward_cpu);
  m.impl("pointwise_distance_backward", &pointwise_distance_backward_cpu);
  m.impl("correlation_distance_forward", &correlation_distance_forward_cpu);
  m.impl("correlation_distance_backward", &correlation_distance_backward_cpu);
}

}  // namespace distillkit
