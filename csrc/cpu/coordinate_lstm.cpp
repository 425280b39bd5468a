// CPU kernels of the coordinate-wise LSTM optimizer step (docs/math.md §8).
//
// Coordinates are independent rows that share small weights, so each block of
// kBlockRows coordinates runs the whole stack in L1/L2-resident scratch: per
// layer, gates = [x | h_l | 1] · W_t (the bias is a weight row against a
// column of ones) is a register-blocked GEMM on the block, then the gate math
// is fused and writes h_out / c_out straight to memory. Nothing of size
// (P, 4H) ever reaches memory: a step reads grad, params, h, c and writes
// params_out, h_out, c_out once.
//
// The backward (one step of truncated BPTT) recomputes each block's gates
// from the saved (grad, h, c), keeps the block's activations in scratch and
// runs the adjoints top-down: Ā = gate pre-activation adjoints, dX = Ā · W
// (x̄ for the layer below, h̄_prev), dW += Āᵀ · [x | h | 1] (the ones column
// gives the bias gradient). Weight gradients are reductions over P: the
// blocks form a fixed number of groups that depends only on P, each group
// sums its blocks in order into its own partial, and the partials are added
// in group order, so the result has the same bits for any thread count.
//
// The GEMMs are cpu/small_gemm.h's register-blocked microkernel: K is at most
// 2 H + 1 <= 257 and N at most 4 H = 512, sizes where a BLAS call costs more
// in dispatch and packing than it saves (and at::native::cpublas::gemm's
// fp32/fp64 overloads are not exported by libtorch_cpu, so they do not link).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "coordinate_lstm.h"
#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "cpu/small_gemm.h"
#include "cpu/vec_tiles.h"

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Block rows are padded to a multiple of this, so that every small_gemm tile
// of a block is whole, the taller tiles of narrow outputs included.
constexpr int64_t kRowPad = cpu::kSmallGemmNarrowRows;

// Coordinates per block: a block's scratch (every layer's X, gates and
// tanh(c'), ~0.5 MB for 4 layers of H = 128 in fp32) stays within L2, and the
// weight panels are reused over kBlockRows rows; 128 measured no
// faster.
constexpr int64_t kBlockRows = 64;
// Weight-gradient partials: at most this many groups of blocks (each a copy
// of every weight gradient), enough to keep any CPU's threads busy.
constexpr int64_t kMaxGroups = 64;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Blocks per parallel task: at least ~1M multiply-adds, so that a small P
// (a few blocks of a 2 x 20 stack) runs on one thread instead of paying for
// waking the others, which costs milliseconds on a busy machine.
int64_t block_grain(const LstmShape& shape) {
  int64_t fma_per_row = 0;
  for (int l = 0; l < shape.layers; ++l) {
    fma_per_row += (shape.input[l] + shape.hidden[l] + 1) * 4 * shape.hidden[l];
  }
  return std::max<int64_t>(1, (int64_t{1} << 20) / (kBlockRows * fma_per_row));
}

// --- elementwise pieces -----------------------------------------------------------

// 1 / d. For fp32 on AVX-512: rcp14 and one Newton step (relative error
// ~2^-28, below fp32 rounding) instead of a divide, whose throughput would
// bound the gate math. d >= 1 here, so no zero or infinity reaches it.
template <typename T>
Vectorized<T> vrecip(Vectorized<T> d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 dv = d;
    const __m512 r = _mm512_rcp14_ps(dv);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(dv, r, _mm512_set1_ps(2.f)));
  }
#endif
  return Vectorized<T>(T(1)) / d;
}

// σ(x) = 1 / (1 + e^-x). exp_u20 is a few ulp from exp: well inside the
// tolerance of a sum over gates, and the transcendentals, not the GEMMs,
// dominated the step with the 1-ulp exp and a divide. e^-x is capped at e^80
// so that 1 + e^-x stays finite for the reciprocal (σ(x < -80) < 2e-35 is
// returned as e^-80); NaN stays NaN.
template <typename T>
Vectorized<T> vsigmoid(Vectorized<T> x) {
  using Vec = Vectorized<T>;
  const Vec e = at::vec::minimum(Vec(T(0)) - x, Vec(T(80))).exp_u20();
  return Vec::blendv(vrecip(Vec(T(1)) + e), x, x != x);
}

// tanh(x) = 2 σ(2x) - 1: one exp and one reciprocal, like σ; its absolute
// error is an ulp of 1, which is what the states and gradients see.
template <typename T>
Vectorized<T> vtanh(Vectorized<T> x) {
  using Vec = Vectorized<T>;
  return at::vec::fmadd(Vec(T(2)), vsigmoid(x + x), Vec(T(-1)));
}

// --- shapes, packed weights and scratch of one call -------------------------------

// Layer l's operand sizes: X = [x | h_l | 1] has K + 1 columns, padded to Kp;
// the 4H gate columns are padded to Np; one unit row of h / c to Hp.
struct LayerDims {
  int64_t in, H, K, Kp, N, Np, Hp, off;
};

template <typename T>
struct LstmKernelParams {
  int64_t P = 0, width = 0;
  int layers = 0;
  LayerDims dim[kLstmMaxLayers];
  // wt[l] (K + 1, Np) = [w_ih | w_hh | bias]ᵀ with the g-gate columns
  // doubled, for gates = X · wt: σ of every column then gives σ(i), σ(f),
  // σ(o) and tanh g = 2 σ(2g) - 1 in one pass over the whole block's gates,
  // in whole vectors whatever H (doubling is exact, so nothing is rounded
  // differently). wc[l] (N, Kp) = [w_ih | w_hh | bias], for dX = Ā · wc.
  // Both zero padded.
  const T* wt[kLstmMaxLayers] = {};
  const T* wc[kLstmMaxLayers] = {};
  const T* head_w = nullptr;  // (Hp_L,), zero padded; nullptr without a head
  T head_b = 0;
  T p = 0, exp_p = 0, eps = 0, scale = 0;

  const T* grad = nullptr;
  const T* params = nullptr;
  const T* h = nullptr;
  const T* c = nullptr;
  T* params_out = nullptr;
  T* h_out = nullptr;
  T* c_out = nullptr;

  const T* grad_params_out = nullptr;
  const T* grad_h_out = nullptr;  // nullptr: zeros
  const T* grad_c_out = nullptr;  // nullptr: zeros
  T* grad_grad = nullptr;
  T* grad_h = nullptr;
  T* grad_c = nullptr;

  // Scratch of one block (offsets in elements into one per-thread buffer):
  // per layer X, gates / activations and tanh(c'); the last layer's h'; and
  // for the backward Ā, dX and h̄.
  int64_t x_off[kLstmMaxLayers] = {}, g_off[kLstmMaxLayers] = {}, tc_off[kLstmMaxLayers] = {};
  int64_t hl_off = 0, abar_off = 0, dx_off = 0, hbar_off = 0, scratch = 0;
  int64_t Kpmax = 0, Npmax = 0, Hpmax = 0;

  // Weight-gradient partial of one group: dW[l] (N, Kp) (column K = bias),
  // then the head's weight (Hp_L) and bias (one vector).
  int64_t w_off[kLstmMaxLayers] = {};
  int64_t head_w_off = 0, head_b_off = 0, partial = 0;
};

// Packs the weights (transposed and not) once per call and lays out scratch.
template <typename T>
struct Packed {
  std::vector<T> wt, wc, head_w;
  LstmKernelParams<T> p;

  Packed(const LstmShape& shape, at::TensorList w_ih, at::TensorList w_hh, at::TensorList bias,
         const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias,
         double preprocess_p, double output_scale) {
    constexpr int64_t V = Vectorized<T>::size();
    p.P = shape.P;
    p.width = shape.width;
    p.layers = shape.layers;
    int64_t wt_size = 0, wc_size = 0;
    for (int l = 0; l < shape.layers; ++l) {
      LayerDims& d = p.dim[l];
      d.in = shape.input[l];
      d.H = shape.hidden[l];
      d.K = d.in + d.H;
      d.Kp = round_up(d.K + 1, V);
      d.N = 4 * d.H;
      d.Np = round_up(d.N, V);
      d.Hp = round_up(d.H, V);
      d.off = shape.offset[l];
      wt_size += (d.K + 1) * d.Np;
      wc_size += d.N * d.Kp;
      p.Kpmax = std::max(p.Kpmax, d.Kp);
      p.Npmax = std::max(p.Npmax, d.Np);
      p.Hpmax = std::max(p.Hpmax, d.Hp);
    }
    wt.assign(wt_size, T(0));
    wc.assign(wc_size, T(0));
    int64_t ot = 0, oc = 0;
    for (int l = 0; l < shape.layers; ++l) {
      const LayerDims& d = p.dim[l];
      const at::Tensor wi = w_ih[l].contiguous(), wh = w_hh[l].contiguous(), bl = bias[l].contiguous();
      const T* wip = wi.data_ptr<T>();
      const T* whp = wh.data_ptr<T>();
      const T* bp = bl.data_ptr<T>();
      T* t = wt.data() + ot;
      T* cc = wc.data() + oc;
      for (int64_t n = 0; n < d.N; ++n) {
        for (int64_t k = 0; k <= d.K; ++k) {
          const T w = k < d.in ? wip[n * d.in + k] : k < d.K ? whp[n * d.H + k - d.in] : bp[n];
          t[k * d.Np + n] = n >= 2 * d.H && n < 3 * d.H ? T(2) * w : w;
          cc[n * d.Kp + k] = w;
        }
      }
      p.wt[l] = t;
      p.wc[l] = cc;
      ot += (d.K + 1) * d.Np;
      oc += d.N * d.Kp;
    }
    const LayerDims& last = p.dim[shape.layers - 1];
    if (shape.head) {
      const at::Tensor hw = head_weight->contiguous();
      head_w.assign(last.Hp, T(0));
      std::copy(hw.data_ptr<T>(), hw.data_ptr<T>() + last.H, head_w.begin());
      p.head_w = head_w.data();
      p.head_b = head_bias->item<T>();
    }
    p.p = static_cast<T>(preprocess_p);
    p.exp_p = static_cast<T>(std::exp(preprocess_p));
    p.eps = static_cast<T>(kLstmPreprocessEps);
    p.scale = static_cast<T>(output_scale);

    int64_t s = 0;
    for (int l = 0; l < shape.layers; ++l) {
      p.x_off[l] = s;
      s += kBlockRows * p.dim[l].Kp;
      p.g_off[l] = s;
      s += kBlockRows * p.dim[l].Np;
      p.tc_off[l] = s;
      s += kBlockRows * p.dim[l].Hp;
    }
    p.hl_off = s;
    s += kBlockRows * last.Hp;
    p.abar_off = s;
    s += kBlockRows * p.Npmax;
    p.dx_off = s;
    s += kBlockRows * p.Kpmax;
    p.hbar_off = s;
    s += kBlockRows * p.Hpmax;
    p.scratch = s;

    int64_t w = 0;
    for (int l = 0; l < shape.layers; ++l) {
      p.w_off[l] = w;
      w += p.dim[l].N * p.dim[l].Kp;
    }
    p.head_w_off = w;
    w += last.Hp;
    p.head_b_off = w;
    w += V;
    p.partial = w;
  }
};

// --- forward of one block -----------------------------------------------------------

// Runs rows [r0, r0 + n) through the stack. kBackward keeps what the backward
// needs in scratch (σ(i), σ(f), σ(2g), σ(o) in place of the gates, and
// tanh(c')) instead of writing h_out / c_out / params_out.
template <typename T, bool kBackward>
void forward_block(const LstmKernelParams<T>& p, int64_t r0, int64_t n, T* scratch) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t Mr = round_up(n, kRowPad);

  // Layer 0's X = [a, b | h_0 | 1]; rows beyond n (up to a multiple of kRowPad)
  // are zeroed so that they stay finite and add nothing to dW.
  {
    const LayerDims& d = p.dim[0];
    T* X = scratch + p.x_off[0];
    for (int64_t r = 0; r < n; ++r) {
      const T g = p.grad[r0 + r];
      T* xr = X + r * d.Kp;
      const T u = std::log(std::abs(g) + p.eps) / p.p;
      const T v = g * p.exp_p;
      xr[0] = u < T(-1) ? T(-1) : u;
      xr[1] = v < T(-1) ? T(-1) : v > T(1) ? T(1) : v;
      std::memcpy(xr + d.in, p.h + (r0 + r) * p.width + d.off, d.H * sizeof(T));
      xr[d.K] = T(1);
    }
    std::fill(X + n * d.Kp, X + Mr * d.Kp, T(0));
  }

  for (int l = 0; l < p.layers; ++l) {
    const LayerDims& d = p.dim[l];
    const T* X = scratch + p.x_off[l];
    T* G = scratch + p.g_off[l];
    cpu::small_gemm<T>(Mr, d.Np, d.K + 1, X, d.Kp, 1, p.wt[l], d.Np, G, d.Np, false);
    for (int64_t e = 0; e < Mr * d.Np; e += V) vsigmoid(Vec::loadu(G + e)).store(G + e);

    const bool last = l + 1 == p.layers;
    const LayerDims* dn = last ? nullptr : &p.dim[l + 1];
    T* Xn = last ? scratch + p.hl_off : scratch + p.x_off[l + 1];
    const int64_t ldn = last ? d.Hp : dn->Kp;
    T* TC = scratch + p.tc_off[l];
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = (r0 + r) * p.width + d.off;
      T* gr = G + r * d.Np;
      for (int64_t j = 0; j < d.H; j += V) {
        const int64_t cnt = std::min(V, d.H - j);
        const Vec i = Vec::loadu(gr + j, cnt);
        const Vec f = Vec::loadu(gr + d.H + j, cnt);
        const Vec g = at::vec::fmadd(Vec(T(2)), Vec::loadu(gr + 2 * d.H + j, cnt), Vec(T(-1)));
        const Vec o = Vec::loadu(gr + 3 * d.H + j, cnt);
        const Vec cn = f * Vec::loadu(p.c + row + j, cnt) + i * g;
        const Vec tc = vtanh(cn);
        const Vec hn = o * tc;
        if constexpr (kBackward) {
          tc.store(TC + r * d.Hp + j, cnt);
        } else {
          cn.store(p.c_out + row + j, cnt);
          hn.store(p.h_out + row + j, cnt);
        }
        hn.store(Xn + r * ldn + j, cnt);
      }
      if (!last) {
        T* xr = Xn + r * ldn;
        std::memcpy(xr + d.H, p.h + (r0 + r) * p.width + dn->off, dn->H * sizeof(T));
        xr[dn->K] = T(1);
      }
    }
  }

  if constexpr (!kBackward) {
    const LayerDims& d = p.dim[p.layers - 1];
    const T* HL = scratch + p.hl_off;
    for (int64_t r = 0; r < n; ++r) {
      const T* hr = HL + r * d.Hp;
      T out;
      if (p.head_w != nullptr) {
        Vec acc(T(0));
        for (int64_t j = 0; j < d.H; j += V) {
          acc = at::vec::fmadd(Vec::loadu(hr + j, std::min(V, d.H - j)), Vec::loadu(p.head_w + j),
                               acc);
        }
        out = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc) + p.head_b;
      } else {
        out = hr[0];
      }
      p.params_out[r0 + r] = p.params[r0 + r] + p.scale * out;
    }
  }
}

// --- backward of one block ----------------------------------------------------------

// d/dg of the preprocessing (a, b) given their adjoints, with torch's
// conventions: a clamp passes no gradient at its bounds (torch.clamp's
// backward is zero where the input equals min or max) and d|g|/dg = 0 at g = 0.
template <typename T>
T preprocess_backward(const LstmKernelParams<T>& p, T g, T abar, T bbar) {
  const T ag = std::abs(g) + p.eps;
  const T u = std::log(ag) / p.p;
  const T sign = g > T(0) ? T(1) : g < T(0) ? T(-1) : T(0);
  const T da = u > T(-1) ? abar / p.p / ag * sign : T(0);
  const T v = g * p.exp_p;
  const T db = v > T(-1) && v < T(1) ? bbar * p.exp_p : T(0);
  return da + db;
}

template <typename T>
void backward_block(const LstmKernelParams<T>& p, int64_t r0, int64_t n, T* scratch, T* part) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t Mr = round_up(n, kRowPad);
  forward_block<T, true>(p, r0, n, scratch);

  T* Abar = scratch + p.abar_off;
  T* dX = scratch + p.dx_off;
  T* Hbar = scratch + p.hbar_off;

  // The output: out = head_w · h_L + head_b (or h_L), params_out = params + s out.
  {
    const LayerDims& d = p.dim[p.layers - 1];
    const T* HL = scratch + p.hl_off;
    if (p.head_w != nullptr) {
      T* gw = part + p.head_w_off;
      T gb = 0;
      for (int64_t r = 0; r < n; ++r) {
        const T ob = p.scale * p.grad_params_out[r0 + r];
        const Vec vob(ob);
        for (int64_t j = 0; j < d.H; j += V) {
          const int64_t cnt = std::min(V, d.H - j);
          (vob * Vec::loadu(p.head_w + j)).store(Hbar + r * p.Hpmax + j, cnt);
          at::vec::fmadd(vob, Vec::loadu(HL + r * d.Hp + j, cnt), Vec::loadu(gw + j)).store(gw + j);
        }
        gb += ob;
      }
      part[p.head_b_off] += gb;
    } else {
      for (int64_t r = 0; r < n; ++r) Hbar[r * p.Hpmax] = p.scale * p.grad_params_out[r0 + r];
    }
  }

  for (int l = p.layers - 1; l >= 0; --l) {
    const LayerDims& d = p.dim[l];
    const T* X = scratch + p.x_off[l];
    const T* G = scratch + p.g_off[l];
    const T* TC = scratch + p.tc_off[l];
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = (r0 + r) * p.width + d.off;
      const T* gr = G + r * d.Np;
      T* ar = Abar + r * d.Np;
      for (int64_t j = 0; j < d.H; j += V) {
        const int64_t cnt = std::min(V, d.H - j);
        Vec hb = Vec::loadu(Hbar + r * p.Hpmax + j, cnt);
        if (p.grad_h_out != nullptr) hb = hb + Vec::loadu(p.grad_h_out + row + j, cnt);
        const Vec i = Vec::loadu(gr + j, cnt);
        const Vec f = Vec::loadu(gr + d.H + j, cnt);
        const Vec g = at::vec::fmadd(Vec(T(2)), Vec::loadu(gr + 2 * d.H + j, cnt), Vec(T(-1)));
        const Vec o = Vec::loadu(gr + 3 * d.H + j, cnt);
        const Vec tc = Vec::loadu(TC + r * d.Hp + j, cnt);
        const Vec one(T(1));
        Vec cb = hb * o * (one - tc * tc);
        if (p.grad_c_out != nullptr) cb = cb + Vec::loadu(p.grad_c_out + row + j, cnt);
        (cb * g * i * (one - i)).store(ar + j, cnt);
        (cb * Vec::loadu(p.c + row + j, cnt) * f * (one - f)).store(ar + d.H + j, cnt);
        (cb * i * (one - g * g)).store(ar + 2 * d.H + j, cnt);
        (hb * tc * o * (one - o)).store(ar + 3 * d.H + j, cnt);
        (cb * f).store(p.grad_c + row + j, cnt);
      }
    }
    std::fill(Abar + n * d.Np, Abar + Mr * d.Np, T(0));

    // dW += Āᵀ X (column K: the bias), dX = Ā · [w_ih | w_hh].
    cpu::small_gemm<T>(d.N, d.Kp, Mr, Abar, 1, d.Np, X, d.Kp, part + p.w_off[l], d.Kp, true);
    cpu::small_gemm<T>(Mr, round_up(d.K, V), d.N, Abar, d.Np, 1, p.wc[l], d.Kp, dX, d.Kp, false);
    for (int64_t r = 0; r < n; ++r) {
      const T* xr = dX + r * d.Kp;
      std::memcpy(p.grad_h + (r0 + r) * p.width + d.off, xr + d.in, d.H * sizeof(T));
      if (l > 0) {
        std::memcpy(Hbar + r * p.Hpmax, xr, d.in * sizeof(T));
      } else {
        p.grad_grad[r0 + r] = preprocess_backward(p, p.grad[r0 + r], xr[0], xr[1]);
      }
    }
  }
}

// --- host ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> coordinate_lstm_forward_cpu(
    const at::Tensor& grad, const at::Tensor& params, const at::Tensor& h, const at::Tensor& c,
    at::TensorList w_ih, at::TensorList w_hh, at::TensorList bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias,
    double preprocess_p, double output_scale) {
  const LstmShape shape = check_coordinate_lstm_args(grad, params, h, c, w_ih, w_hh, bias,
                                                     head_weight, head_bias, preprocess_p,
                                                     output_scale);
  const at::Tensor g = grad.contiguous(), pa = params.contiguous();
  const at::Tensor hc = h.contiguous(), cc = c.contiguous();
  at::Tensor params_out = at::empty_like(pa);
  at::Tensor h_out = cpu::empty_like_cached(hc), c_out = cpu::empty_like_cached(cc);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "coordinate_lstm_forward_cpu", [&] {
    Packed<scalar_t> pk(shape, w_ih, w_hh, bias, head_weight, head_bias, preprocess_p,
                        output_scale);
    LstmKernelParams<scalar_t>& p = pk.p;
    p.grad = g.data_ptr<scalar_t>();
    p.params = pa.data_ptr<scalar_t>();
    p.h = hc.data_ptr<scalar_t>();
    p.c = cc.data_ptr<scalar_t>();
    p.params_out = params_out.data_ptr<scalar_t>();
    p.h_out = h_out.data_ptr<scalar_t>();
    p.c_out = c_out.data_ptr<scalar_t>();
    const int64_t blocks = (shape.P + kBlockRows - 1) / kBlockRows;
    at::parallel_for(0, blocks, block_grain(shape), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(p.scratch, scalar_t(0));
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * kBlockRows;
        forward_block<scalar_t, false>(p, r0, std::min(kBlockRows, shape.P - r0), scratch.data());
      }
    });
  });
  return {params_out, h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor, at::Tensor>
coordinate_lstm_backward_cpu(const at::Tensor& grad_params_out,
                             const std::optional<at::Tensor>& grad_h_out,
                             const std::optional<at::Tensor>& grad_c_out, const at::Tensor& grad,
                             const at::Tensor& h, const at::Tensor& c, at::TensorList w_ih,
                             at::TensorList w_hh, at::TensorList bias,
                             const std::optional<at::Tensor>& head_weight,
                             const std::optional<at::Tensor>& head_bias, double preprocess_p,
                             double output_scale) {
  // params only fixes P: grad stands in for it (same shape and dtype).
  const LstmShape shape = check_coordinate_lstm_args(grad, grad, h, c, w_ih, w_hh, bias,
                                                     head_weight, head_bias, preprocess_p,
                                                     output_scale);
  check_coordinate_lstm_backward_args(grad_params_out, grad_h_out, grad_c_out, grad, h);
  const at::Tensor gpo = grad_params_out.contiguous(), g = grad.contiguous();
  const at::Tensor hc = h.contiguous(), cc = c.contiguous();
  const at::Tensor gho = contiguous_or_undefined(grad_h_out);
  const at::Tensor gco = contiguous_or_undefined(grad_c_out);
  at::Tensor grad_grad = at::empty_like(g);
  at::Tensor grad_h = cpu::empty_like_cached(hc), grad_c = cpu::empty_like_cached(cc);
  std::vector<at::Tensor> grad_w_ih, grad_w_hh, grad_bias;
  at::Tensor grad_head_w, grad_head_b;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "coordinate_lstm_backward_cpu", [&] {
    using T = scalar_t;
    Packed<T> pk(shape, w_ih, w_hh, bias, head_weight, head_bias, preprocess_p, output_scale);
    LstmKernelParams<T>& p = pk.p;
    p.grad = g.data_ptr<T>();
    p.h = hc.data_ptr<T>();
    p.c = cc.data_ptr<T>();
    p.grad_params_out = gpo.data_ptr<T>();
    p.grad_h_out = gho.defined() ? gho.data_ptr<T>() : nullptr;
    p.grad_c_out = gco.defined() ? gco.data_ptr<T>() : nullptr;
    p.grad_grad = grad_grad.data_ptr<T>();
    p.grad_h = grad_h.data_ptr<T>();
    p.grad_c = grad_c.data_ptr<T>();

    // Groups of consecutive blocks, fixed by P alone; one thread runs a group.
    const int64_t blocks = (shape.P + kBlockRows - 1) / kBlockRows;
    const int64_t groups = std::min(blocks, kMaxGroups);
    std::vector<T> partials(groups * p.partial, T(0));
    const int64_t grain = std::max<int64_t>(1, block_grain(shape) * groups / std::max<int64_t>(blocks, 1));
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(p.scratch, T(0));
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t b0 = gi * blocks / groups, b1 = (gi + 1) * blocks / groups;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * kBlockRows;
          backward_block<T>(p, r0, std::min(kBlockRows, shape.P - r0), scratch.data(),
                            partials.data() + gi * p.partial);
        }
      }
    });
    // The partials in group order, accumulated in double.
    std::vector<double> total(p.partial, 0.0);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const T* src = partials.data() + gi * p.partial;
      for (int64_t e = 0; e < p.partial; ++e) total[e] += src[e];
    }

    const auto opts = g.options();
    for (int l = 0; l < shape.layers; ++l) {
      const LayerDims& d = p.dim[l];
      at::Tensor gi = at::empty({d.N, d.in}, opts), gh = at::empty({d.N, d.H}, opts);
      at::Tensor gb = at::empty({d.N}, opts);
      T *pi = gi.data_ptr<T>(), *ph = gh.data_ptr<T>(), *pb = gb.data_ptr<T>();
      const double* src = total.data() + p.w_off[l];
      for (int64_t nn = 0; nn < d.N; ++nn) {
        const double* sr = src + nn * d.Kp;
        for (int64_t k = 0; k < d.in; ++k) pi[nn * d.in + k] = static_cast<T>(sr[k]);
        for (int64_t k = 0; k < d.H; ++k) ph[nn * d.H + k] = static_cast<T>(sr[d.in + k]);
        pb[nn] = static_cast<T>(sr[d.K]);
      }
      grad_w_ih.push_back(gi);
      grad_w_hh.push_back(gh);
      grad_bias.push_back(gb);
    }
    if (shape.head) {
      const LayerDims& d = p.dim[shape.layers - 1];
      grad_head_w = at::empty({1, d.H}, opts);
      grad_head_b = at::empty({1}, opts);
      for (int64_t j = 0; j < d.H; ++j) {
        grad_head_w.data_ptr<T>()[j] = static_cast<T>(total[p.head_w_off + j]);
      }
      grad_head_b.data_ptr<T>()[0] = static_cast<T>(total[p.head_b_off]);
    } else {
      grad_head_w = at::empty({0}, opts);
      grad_head_b = at::empty({0}, opts);
    }
  });
  return {grad_grad, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_head_w, grad_head_b};
}

}  // namespace
}  // namespace distillkit::cpu::inline CPU_CAPABILITY

DK_CPU_KERNEL(coordinate_lstm_forward, coordinate_lstm_forward_cpu)
DK_CPU_KERNEL(coordinate_lstm_backward, coordinate_lstm_backward_cpu)

// Registered once, by the default level's build (it runs on every CPU); each call
// goes to the chosen level's kernel.
#if defined(CPU_CAPABILITY_DEFAULT)
TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("coordinate_lstm_forward", DK_CPU_DISPATCH(coordinate_lstm_forward));
  m.impl("coordinate_lstm_backward", DK_CPU_DISPATCH(coordinate_lstm_backward));
}
#endif
