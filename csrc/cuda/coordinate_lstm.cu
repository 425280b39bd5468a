// CUDA kernels of the coordinate-wise LSTM optimizer step (docs/math.md §8); the
// shapes and argument checks are shared with the CPU kernels
// (coordinate_lstm.h), and distillkit/reference.py::coordinate_lstm_step_ref
// is the oracle.
//
// Mapping: one thread per coordinate. Every thread of a warp walks the same
// layers, hidden units and weight indices in the same order, so a weight load
// is one address for the whole warp: a broadcast from shared memory when the
// packed weights fit (2x20 in fp32 is ~20 KB), else through the read-only
// cache (__ldg; the 2-64-64-64-1 stack is ~330 KB). A thread keeps its layer
// input, the layer's incoming h and the new h in local arrays sized for the
// largest hidden size, bucketed at compile time (kSmallHidden or
// kLstmMaxHidden) so that small networks do not reserve 128-wide arrays
// (local memory is reserved per resident thread); indices are
// warp-uniform, so local memory accesses are coalesced. Gate pre-activations
// are formed one hidden unit at a time (4 accumulators), never a 4H vector.
//
// Forward: one pass; per layer, h and c are read once and h_out, c_out written
// once.
//
// Backward (one step, from the saved grad, h and c only): a block takes tiles
// of kTile coordinates, one per thread. Per tile, layers go top down; layer
// l's input x_l is recomputed by running layers 0..l-1 forward (L(L-1)/2 layer
// evaluations, L <= 8, instead of keeping P x sum(H) activations), then the
// gates of layer l are recomputed unit by unit and turned into the gate
// pre-activation adjoints ga (4H, per thread). The adjoints of h (grad_h),
// c (grad_c) and x (the h-bar of the layer below, or grad_grad through the
// preprocessing) follow per thread.
//
// Weight gradients are outer-product sums over coordinates, G[r][k] =
// sum_p ga_p[r] * xa_p[k] with xa = [x_l, h_l, 1] (the last column gives the
// bias); the head is one more such matrix (ga = dout, xa = [h_L, 1]). Per tile,
// the block stages 32 x 32 chunks of ga and xa in shared memory (coordinate
// fastest, padded against bank conflicts) and each thread sums a 4 x 4
// register tile of G over the tile's coordinates in coordinate order, then adds
// it to the block's row of a (blocks, W) partial buffer (stored on the block's
// first tile, added after). Every partial entry has exactly one owning thread,
// so no atomics; a second kernel sums the partials over blocks in block order.
// The number of blocks depends on P and W only (not on the GPU's size), so
// runs with the same shapes and build are bitwise reproducible.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "coordinate_lstm.h"
#include "launch.cuh"

namespace distillkit {
namespace {

using device::acc_abs;
using device::acc_exp;
using device::acc_log;
using launch::grid_for;

constexpr int kForwardThreads = 256;
// The backward's tile: one coordinate per thread, the reduction's inner
// length. 64 keeps the staging buffers at 16.6 KB (fp32) so that the 2x20
// weights still fit beside them under kSmemLimit.
constexpr int kTile = 64;
// Reduction chunk: kChunk rows of ga x kChunk columns of xa per round; each of
// the kTile threads owns a kMicro x kMicro register tile of it.
constexpr int kChunk = 32;
constexpr int kMicro = 4;
constexpr int kMicroStride = kChunk / kMicro;  // 8 row groups x 8 column groups
static_assert(kMicroStride * kMicroStride == kTile, "one micro tile per thread");
// Shared memory per block without the opt-in attribute: weights go to shared
// memory when they fit beside the kernel's static buffers under this.
constexpr size_t kSmemLimit = 48 * 1024;
// Networks whose layers are all at most this wide use 32-wide local arrays.
constexpr int kSmallHidden = 32;
// Forward: the weights are copied to shared memory once per block, so cap
// the grid (the loop strides over the rest); 4096 blocks fill any current GPU.
constexpr int kMaxForwardBlocks = 4096;
// Backward partials: at most kMaxPartials blocks and kPartialBudget elements
// of partial buffer. Fixed numbers: the summation order depends on the
// shapes only. Blocks are few-warp and smem-bound (about 6 per SM for 2x20),
// so the cap is several waves of a current GPU, which keeps the last wave's
// idle share small.
constexpr int kMaxPartials = 2048;
constexpr int64_t kPartialBudget = int64_t{1} << 25;
constexpr int kFinishThreads = 256;
// The layers' gradient matrices, then the head's.
constexpr int kMaxMatrices = kLstmMaxLayers + 1;

__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + acc_exp(-x));
}

// The network of one call: shapes, weights and scalars, shared by both
// kernels. Pointers are the caller's contiguous tensors; `packed` gives each
// layer's offset in the shared-memory copy, [w_ih | w_hh | bias] per layer and
// [head_weight | head_bias] after the last.
template <typename T>
struct Net {
  const T* w_ih[kLstmMaxLayers];
  const T* w_hh[kLstmMaxLayers];
  const T* bias[kLstmMaxLayers];
  const T* head_weight;  // nullptr without a head
  const T* head_bias;
  int packed[kMaxMatrices];
  int packed_total;
  int layers;
  int input[kLstmMaxLayers];
  int hidden[kLstmMaxLayers];
  int offset[kLstmMaxLayers];
  int width;
  int64_t P;
  // 1/p and e^p, rounded as torch rounds the Python floats on CUDA: a
  // tensor divided by a CPU scalar is multiplied by its reciprocal there, and
  // the clamps' gradient masks hinge on the exact value of a at the bound.
  T inv_p;
  T exp_p;
  T eps;
  T scale;
};

template <typename T>
struct ForwardArgs {
  Net<T> net;
  const T* grad;
  const T* params;
  const T* h;
  const T* c;
  T* params_out;
  T* h_out;
  T* c_out;
};

template <typename T>
struct BackwardArgs {
  Net<T> net;
  const T* grad_params_out;
  const T* grad_h_out;  // nullptr: zeros
  const T* grad_c_out;  // nullptr: zeros
  const T* grad;
  const T* h;
  const T* c;
  T* grad_grad;
  T* grad_h;
  T* grad_c;
  T* partials;                   // (gridDim.x, total)
  int matrix[kMaxMatrices + 1];  // matrix m's entries start at matrix[m]
  int total;                     // entries per partial row
};

template <typename T>
struct FinishArgs {
  const T* partials;
  int blocks;
  int total;
  int matrices;
  int matrix[kMaxMatrices + 1];
  int cols[kMaxMatrices];
  int layers;
  int input[kLstmMaxLayers];
  int hidden[kLstmMaxLayers];
  T* grad_w_ih[kLstmMaxLayers];
  T* grad_w_hh[kLstmMaxLayers];
  T* grad_bias[kLstmMaxLayers];
  T* grad_head_weight;  // nullptr without a head
  T* grad_head_bias;
};

// A weight: shared memory, or global through the read-only cache.
template <bool kShared, typename T>
__device__ __forceinline__ T ldw(const T* p) {
  if constexpr (kShared) {
    return *p;
  } else {
    return __ldg(p);
  }
}

template <typename T>
struct LayerWeights {
  const T* ih;  // (4H, in)
  const T* hh;  // (4H, H)
  const T* b;   // (4H,)
};

template <bool kShared, typename T>
__device__ __forceinline__ LayerWeights<T> layer_weights(const Net<T>& n, const T* smem, int l) {
  if constexpr (kShared) {
    const T* ih = smem + n.packed[l];
    const T* hh = ih + 4 * n.hidden[l] * n.input[l];
    return {ih, hh, hh + 4 * n.hidden[l] * n.hidden[l]};
  } else {
    return {n.w_ih[l], n.w_hh[l], n.bias[l]};
  }
}

// head_weight (H_L,) then head_bias, or nullptr without a head.
template <bool kShared, typename T>
__device__ __forceinline__ const T* head_weights(const Net<T>& n, const T* smem) {
  if constexpr (kShared) {
    return n.head_weight == nullptr ? nullptr : smem + n.packed[n.layers];
  } else {
    return n.head_weight;
  }
}

template <bool kShared, typename T>
__device__ __forceinline__ const T* head_bias(const Net<T>& n, const T* smem) {
  if constexpr (kShared) {
    return smem + n.packed[n.layers] + n.hidden[n.layers - 1];
  } else {
    return n.head_bias;
  }
}

template <typename T>
__device__ __forceinline__ void copy_block(T* dst, const T* src, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// Copies the weights into the packed shared-memory layout; the caller syncs.
template <typename T>
__device__ void stage_weights(const Net<T>& n, T* smem) {
  for (int l = 0; l < n.layers; ++l) {
    const int H = n.hidden[l];
    const int in = n.input[l];
    T* dst = smem + n.packed[l];
    copy_block(dst, n.w_ih[l], 4 * H * in);
    copy_block(dst + 4 * H * in, n.w_hh[l], 4 * H * H);
    copy_block(dst + 4 * H * (in + H), n.bias[l], 4 * H);
  }
  if (n.head_weight != nullptr) {
    const int H = n.hidden[n.layers - 1];
    copy_block(smem + n.packed[n.layers], n.head_weight, H);
    copy_block(smem + n.packed[n.layers] + H, n.head_bias, 1);
  }
}

// The network input (a, b) of a raw gradient g. The clamps are written as
// comparisons so that a NaN passes through, as torch.clamp lets it.
template <typename T>
__device__ __forceinline__ void preprocess(const Net<T>& n, T g, T* x) {
  const T a = acc_log(acc_abs(g) + n.eps) * n.inv_p;
  const T b = g * n.exp_p;
  x[0] = a < T(-1) ? T(-1) : a;
  x[1] = b < T(-1) ? T(-1) : (b > T(1) ? T(1) : b);
}

// d/dg of the preprocessing given the adjoints of a and b, with torch's
// conventions (as the CPU kernel): a clamp passes the gradient only strictly
// inside its bounds (torch.clamp's backward is zero where the input equals
// min or max), and d|g|/dg = sign(g), 0 at g = 0.
template <typename T>
__device__ __forceinline__ T preprocess_backward(const Net<T>& n, T g, T a_bar, T b_bar) {
  const T mag = acc_abs(g) + n.eps;
  const T a = acc_log(mag) * n.inv_p;
  const T b = g * n.exp_p;
  const T sign = g > T(0) ? T(1) : (g < T(0) ? T(-1) : T(0));
  const T da = a > T(-1) ? a_bar * n.inv_p / mag * sign : T(0);
  const T db = (b > T(-1) && b < T(1)) ? b_bar * n.exp_p : T(0);
  return da + db;
}

// The four gate pre-activations (i, f, g, o) of hidden unit j:
// bias + W_ih x + W_hh h.
template <bool kShared, typename T>
__device__ __forceinline__ void unit_gates(const LayerWeights<T>& w, int in, int H, int j,
                                           const T* x, const T* hp, T (&z)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) z[q] = ldw<kShared>(w.b + q * H + j);
  for (int k = 0; k < in; ++k) {
    const T xk = x[k];
#pragma unroll
    for (int q = 0; q < 4; ++q) z[q] += ldw<kShared>(w.ih + (q * H + j) * in + k) * xk;
  }
  for (int k = 0; k < H; ++k) {
    const T hk = hp[k];
#pragma unroll
    for (int q = 0; q < 4; ++q) z[q] += ldw<kShared>(w.hh + (q * H + j) * H + k) * hk;
  }
}

// One LSTM cell on one coordinate: x (in,) and the incoming state (hp, c_in)
// give the new hidden state hn (H,); h_out / c_out (nullptr in the backward's
// recomputation) get the new state too.
template <bool kShared, typename T>
__device__ __forceinline__ void cell_forward(const LayerWeights<T>& w, int in, int H, const T* x,
                                             const T* hp, const T* c_in, T* hn, T* h_out,
                                             T* c_out) {
  for (int j = 0; j < H; ++j) {
    T z[4];
    unit_gates<kShared>(w, in, H, j, x, hp, z);
    const T c = sigmoid(z[1]) * c_in[j] + sigmoid(z[0]) * acc_tanh(z[2]);
    const T h = sigmoid(z[3]) * acc_tanh(c);
    hn[j] = h;
    if (h_out != nullptr) {
      h_out[j] = h;
      c_out[j] = c;
    }
  }
}

template <typename T, int kMaxH, bool kShared>
__global__ void __launch_bounds__(kForwardThreads)
    coordinate_lstm_forward_kernel(const __grid_constant__ ForwardArgs<T> args) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const Net<T>& n = args.net;
  if constexpr (kShared) {
    stage_weights(n, smem);
    __syncthreads();
  }
  const T* hw = head_weights<kShared>(n, smem);
  T buf0[kMaxH], buf1[kMaxH], hp[kMaxH];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n.P;
       p += stride) {
    T* x = buf0;
    T* xn = buf1;
    preprocess(n, args.grad[p], x);
    const int64_t row = p * n.width;
    for (int l = 0; l < n.layers; ++l) {
      const int H = n.hidden[l];
      const int64_t at = row + n.offset[l];
      for (int k = 0; k < H; ++k) hp[k] = args.h[at + k];
      cell_forward<kShared>(layer_weights<kShared>(n, smem, l), n.input[l], H, x, hp,
                            args.c + at, xn, args.h_out + at, args.c_out + at);
      std::swap(x, xn);
    }
    T out = x[0];
    if (hw != nullptr) {
      const int H = n.hidden[n.layers - 1];
      out = ldw<kShared>(head_bias<kShared>(n, smem));
      for (int k = 0; k < H; ++k) out += ldw<kShared>(hw + k) * x[k];
    }
    args.params_out[p] = args.params[p] + n.scale * out;
  }
}

// Adds sum_t ga_t[r] * xa_t[k] over the kTile coordinates t of the tile to the
// R x C row-major matrix `out` (stores it when `first`). g(r) and x(k) give the
// calling thread's ga[r] and xa[k] (0 for a thread past the end of P). Every
// thread of the block calls it with the same R and C. The leading staging
// writes are safe: every reader of the buffers passed the trailing barrier of
// the previous round (or of the previous call).
template <typename T, typename G, typename X>
__device__ __forceinline__ void reduce_tile(int R, int C, G&& g, X&& x, T* out, bool first,
                                            T (&gs)[kChunk][kTile + 1],
                                            T (&xs)[kChunk][kTile + 1]) {
  const int t = threadIdx.x;
  const int rg = t / kMicroStride;  // rows rg + 8m of the chunk
  const int cg = t % kMicroStride;  // columns cg + 8q
  for (int r0 = 0; r0 < R; r0 += kChunk) {
    for (int k0 = 0; k0 < C; k0 += kChunk) {
      if (k0 == 0) {
        for (int i = 0; i < kChunk; ++i) gs[i][t] = r0 + i < R ? g(r0 + i) : T(0);
      }
      for (int i = 0; i < kChunk; ++i) xs[i][t] = k0 + i < C ? x(k0 + i) : T(0);
      __syncthreads();
      T acc[kMicro][kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) {
#pragma unroll
        for (int q = 0; q < kMicro; ++q) acc[m][q] = T(0);
      }
      for (int s = 0; s < kTile; ++s) {
        T gv[kMicro], xv[kMicro];
#pragma unroll
        for (int m = 0; m < kMicro; ++m) gv[m] = gs[rg + kMicroStride * m][s];
#pragma unroll
        for (int q = 0; q < kMicro; ++q) xv[q] = xs[cg + kMicroStride * q][s];
#pragma unroll
        for (int m = 0; m < kMicro; ++m) {
#pragma unroll
          for (int q = 0; q < kMicro; ++q) acc[m][q] += gv[m] * xv[q];
        }
      }
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kMicro; ++m) {
        const int r = r0 + rg + kMicroStride * m;
#pragma unroll
        for (int q = 0; q < kMicro; ++q) {
          const int k = k0 + cg + kMicroStride * q;
          if (r < R && k < C) {
            T* o = out + static_cast<int64_t>(r) * C + k;
            *o = first ? acc[m][q] : *o + acc[m][q];
          }
        }
      }
    }
  }
}

template <typename T, int kMaxH, bool kShared>
__global__ void __launch_bounds__(kTile)
    coordinate_lstm_backward_kernel(const __grid_constant__ BackwardArgs<T> args) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* smem = reinterpret_cast<T*>(smem_bytes);
  __shared__ T gs[kChunk][kTile + 1];
  __shared__ T xs[kChunk][kTile + 1];
  const Net<T>& n = args.net;
  if constexpr (kShared) {
    stage_weights(n, smem);
    __syncthreads();
  }
  const T* hw = head_weights<kShared>(n, smem);
  const int top = n.layers - 1;
  const int64_t tiles = (n.P + kTile - 1) / kTile;
  T* partial = args.partials + static_cast<int64_t>(blockIdx.x) * args.total;
  // x: layer l's input (recomputed); xn: the next layer's, then h_L for the
  // head; hp: layer l's incoming h; hbar: the adjoint of layer l's new h;
  // ga: layer l's gate pre-activation adjoints, gate-major (i, f, g, o).
  T buf0[kMaxH], buf1[kMaxH], hp[kMaxH], hbar[kMaxH], ga[4 * kMaxH];

  // The tile loop is uniform over the block: reduce_tile's barriers are safe.
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    const int64_t p = tile * kTile + threadIdx.x;
    const bool valid = p < n.P;
    const int64_t row = p * n.width;
    T g = T(0), dout = T(0);
    if (valid) {
      g = args.grad[p];
      dout = args.grad_params_out[p] * n.scale;
    }
    for (int l = top; l >= 0; --l) {
      const int H = n.hidden[l];
      const int in = n.input[l];
      const int64_t at = row + n.offset[l];
      const LayerWeights<T> w = layer_weights<kShared>(n, smem, l);
      T* x = buf0;
      T* xn = buf1;
      if (valid) {
        preprocess(n, g, x);
        for (int k = 0; k < l; ++k) {
          const int Hk = n.hidden[k];
          const int64_t atk = row + n.offset[k];
          for (int i = 0; i < Hk; ++i) hp[i] = args.h[atk + i];
          cell_forward<kShared>(layer_weights<kShared>(n, smem, k), n.input[k], Hk, x, hp,
                                args.c + atk, xn, static_cast<T*>(nullptr),
                                static_cast<T*>(nullptr));
          std::swap(x, xn);
        }
        // The top layer's h-bar comes from the output; lower layers' were
        // left in hbar by the layer above.
        if (l == top) {
          for (int j = 0; j < H; ++j) {
            hbar[j] = hw != nullptr ? dout * ldw<kShared>(hw + j) : dout;
            if (args.grad_h_out != nullptr) hbar[j] += args.grad_h_out[at + j];
          }
        }
        for (int k = 0; k < H; ++k) hp[k] = args.h[at + k];
        for (int j = 0; j < H; ++j) {
          T z[4];
          unit_gates<kShared>(w, in, H, j, x, hp, z);
          const T si = sigmoid(z[0]);
          const T sf = sigmoid(z[1]);
          const T tg = acc_tanh(z[2]);
          const T so = sigmoid(z[3]);
          const T c_in = args.c[at + j];
          const T c = sf * c_in + si * tg;
          const T tc = acc_tanh(c);
          if (l == top) xn[j] = so * tc;  // h_L, for the head's gradient
          const T hb = hbar[j];
          T cb = args.grad_c_out != nullptr ? args.grad_c_out[at + j] : T(0);
          cb += hb * so * (T(1) - tc * tc);
          ga[j] = cb * tg * (si * (T(1) - si));
          ga[H + j] = cb * c_in * (sf * (T(1) - sf));
          ga[2 * H + j] = cb * si * (T(1) - tg * tg);
          ga[3 * H + j] = hb * tc * (so * (T(1) - so));
          args.grad_c[at + j] = cb * sf;
        }
      }
      if (l == top && hw != nullptr) {
        reduce_tile(
            1, H + 1, [&](int) { return dout; },
            [&](int k) { return valid ? (k < H ? xn[k] : T(1)) : T(0); },
            partial + args.matrix[n.layers], first, gs, xs);
      }
      reduce_tile(
          4 * H, in + H + 1, [&](int r) { return valid ? ga[r] : T(0); },
          [&](int k) {
            if (!valid) return T(0);
            return k < in ? x[k] : (k < in + H ? hp[k - in] : T(1));
          },
          partial + args.matrix[l], first, gs, xs);
      if (valid) {
        for (int k = 0; k < H; ++k) {
          T s = T(0);
          for (int r = 0; r < 4 * H; ++r) s += ldw<kShared>(w.hh + r * H + k) * ga[r];
          args.grad_h[at + k] = s;
        }
        if (l > 0) {
          // x_l is layer l-1's new h: its adjoint plus grad_h_out's.
          const int64_t below = row + n.offset[l - 1];
          for (int k = 0; k < in; ++k) {
            T s = T(0);
            for (int r = 0; r < 4 * H; ++r) s += ldw<kShared>(w.ih + r * in + k) * ga[r];
            hbar[k] = args.grad_h_out != nullptr ? s + args.grad_h_out[below + k] : s;
          }
        } else {
          T xb[2];
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            T s = T(0);
            for (int r = 0; r < 4 * H; ++r) s += ldw<kShared>(w.ih + r * 2 + k) * ga[r];
            xb[k] = s;
          }
          args.grad_grad[p] = preprocess_backward(n, g, xb[0], xb[1]);
        }
      }
    }
  }
}

// Entry e of the partial rows: the sum over blocks in block order, written to
// its weight's gradient.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads)
    coordinate_lstm_finish_kernel(const __grid_constant__ FinishArgs<T> args) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < args.total;
       e += stride) {
    T s = T(0);
    for (int b = 0; b < args.blocks; ++b) {
      s += args.partials[static_cast<int64_t>(b) * args.total + e];
    }
    int m = 0;
    while (m + 1 < args.matrices && e >= args.matrix[m + 1]) ++m;
    const int local = static_cast<int>(e) - args.matrix[m];
    const int r = local / args.cols[m];
    const int k = local % args.cols[m];
    if (m < args.layers) {
      const int in = args.input[m];
      const int H = args.hidden[m];
      if (k < in) {
        args.grad_w_ih[m][r * in + k] = s;
      } else if (k < in + H) {
        args.grad_w_hh[m][r * H + (k - in)] = s;
      } else {
        args.grad_bias[m][r] = s;
      }
    } else if (k < args.hidden[args.layers - 1]) {
      args.grad_head_weight[k] = s;
    } else {
      args.grad_head_bias[0] = s;
    }
  }
}

// ---------------------------------------------------------------- host side

// The call's tensors, contiguous, and the network description the kernels get.
template <typename T>
Net<T> make_net(const LstmShape& shape, const std::vector<at::Tensor>& w_ih,
                const std::vector<at::Tensor>& w_hh, const std::vector<at::Tensor>& bias,
                const at::Tensor& head_weight, const at::Tensor& head_bias, double preprocess_p,
                double output_scale) {
  Net<T> n{};
  n.layers = shape.layers;
  int packed = 0;
  for (int l = 0; l < shape.layers; ++l) {
    n.w_ih[l] = w_ih[l].data_ptr<T>();
    n.w_hh[l] = w_hh[l].data_ptr<T>();
    n.bias[l] = bias[l].data_ptr<T>();
    n.input[l] = static_cast<int>(shape.input[l]);
    n.hidden[l] = static_cast<int>(shape.hidden[l]);
    n.offset[l] = static_cast<int>(shape.offset[l]);
    n.packed[l] = packed;
    packed += 4 * n.hidden[l] * (n.input[l] + n.hidden[l] + 1);
  }
  n.packed[shape.layers] = packed;
  if (shape.head) {
    n.head_weight = head_weight.data_ptr<T>();
    n.head_bias = head_bias.data_ptr<T>();
    packed += n.hidden[shape.layers - 1] + 1;
  }
  n.packed_total = packed;
  n.width = static_cast<int>(shape.width);
  n.P = shape.P;
  n.inv_p = T(1) / static_cast<T>(preprocess_p);
  n.exp_p = static_cast<T>(std::exp(preprocess_p));
  n.eps = static_cast<T>(kLstmPreprocessEps);
  n.scale = static_cast<T>(output_scale);
  return n;
}

bool small_hidden(const LstmShape& shape) {
  for (int l = 0; l < shape.layers; ++l) {
    if (shape.hidden[l] > kSmallHidden) return false;
  }
  return true;
}

// One of the four kernels of a (hidden bucket, weights in shared memory) pair.
template <typename Kernel>
Kernel pick_kernel(bool small, bool shared, Kernel small_shared, Kernel small_global,
                   Kernel large_shared, Kernel large_global) {
  if (small) return shared ? small_shared : small_global;
  return shared ? large_shared : large_global;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <typename T>
void launch_forward(const LstmShape& shape, const at::Tensor& grad, const at::Tensor& params,
                    const at::Tensor& h, const at::Tensor& c, const std::vector<at::Tensor>& w_ih,
                    const std::vector<at::Tensor>& w_hh, const std::vector<at::Tensor>& bias,
                    const at::Tensor& head_weight, const at::Tensor& head_bias,
                    double preprocess_p, double output_scale, at::Tensor& params_out,
                    at::Tensor& h_out, at::Tensor& c_out) {
  ForwardArgs<T> args;
  args.net = make_net<T>(shape, w_ih, w_hh, bias, head_weight, head_bias, preprocess_p,
                         output_scale);
  args.grad = grad.data_ptr<T>();
  args.params = params.data_ptr<T>();
  args.h = h.data_ptr<T>();
  args.c = c.data_ptr<T>();
  args.params_out = params_out.data_ptr<T>();
  args.h_out = h_out.data_ptr<T>();
  args.c_out = c_out.data_ptr<T>();
  const size_t weight_bytes = static_cast<size_t>(args.net.packed_total) * sizeof(T);
  const bool shared = weight_bytes <= kSmemLimit;
  auto kernel = pick_kernel(small_hidden(shape), shared,
                            coordinate_lstm_forward_kernel<T, kSmallHidden, true>,
                            coordinate_lstm_forward_kernel<T, kSmallHidden, false>,
                            coordinate_lstm_forward_kernel<T, kLstmMaxHidden, true>,
                            coordinate_lstm_forward_kernel<T, kLstmMaxHidden, false>);
  const dim3 grid(std::min<unsigned>(grid_for(shape.P, kForwardThreads).x, kMaxForwardBlocks));
  kernel<<<grid, kForwardThreads, shared ? weight_bytes : 0,
           c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const LstmShape& shape, const at::Tensor& grad_params_out,
                     const at::Tensor& grad_h_out, const at::Tensor& grad_c_out,
                     const at::Tensor& grad, const at::Tensor& h, const at::Tensor& c,
                     const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh,
                     const std::vector<at::Tensor>& bias, const at::Tensor& head_weight,
                     const at::Tensor& head_bias, double preprocess_p, double output_scale,
                     at::Tensor& grad_grad, at::Tensor& grad_h, at::Tensor& grad_c,
                     std::vector<at::Tensor>& grad_w_ih, std::vector<at::Tensor>& grad_w_hh,
                     std::vector<at::Tensor>& grad_bias, at::Tensor& grad_head_weight,
                     at::Tensor& grad_head_bias) {
  BackwardArgs<T> args;
  args.net = make_net<T>(shape, w_ih, w_hh, bias, head_weight, head_bias, preprocess_p,
                         output_scale);
  FinishArgs<T> finish{};
  // The gradient matrices: per layer 4H x (in + H + 1) = [w_ih | w_hh | bias],
  // then the head's 1 x (H_L + 1) = [head_weight | head_bias].
  int total = 0;
  finish.matrices = shape.layers + (shape.head ? 1 : 0);
  finish.layers = shape.layers;
  for (int m = 0; m < finish.matrices; ++m) {
    int rows = 1;
    int cols = static_cast<int>(shape.hidden[shape.layers - 1]) + 1;
    if (m < shape.layers) {
      rows = 4 * static_cast<int>(shape.hidden[m]);
      cols = static_cast<int>(shape.input[m] + shape.hidden[m]) + 1;
      finish.input[m] = static_cast<int>(shape.input[m]);
      finish.hidden[m] = static_cast<int>(shape.hidden[m]);
      finish.grad_w_ih[m] = grad_w_ih[m].data_ptr<T>();
      finish.grad_w_hh[m] = grad_w_hh[m].data_ptr<T>();
      finish.grad_bias[m] = grad_bias[m].data_ptr<T>();
    }
    args.matrix[m] = finish.matrix[m] = total;
    finish.cols[m] = cols;
    total += rows * cols;
  }
  args.matrix[finish.matrices] = finish.matrix[finish.matrices] = total;
  args.total = finish.total = total;
  if (shape.head) {
    finish.grad_head_weight = grad_head_weight.data_ptr<T>();
    finish.grad_head_bias = grad_head_bias.data_ptr<T>();
  }

  const int64_t tiles = (shape.P + kTile - 1) / kTile;
  const int blocks = static_cast<int>(std::min<int64_t>(
      {tiles, kMaxPartials, std::max<int64_t>(1, kPartialBudget / total)}));
  at::Tensor partials = at::empty({blocks, total}, grad.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    args.grad_params_out = grad_params_out.data_ptr<T>();
    args.grad_h_out = grad_h_out.defined() ? grad_h_out.data_ptr<T>() : nullptr;
    args.grad_c_out = grad_c_out.defined() ? grad_c_out.data_ptr<T>() : nullptr;
    args.grad = grad.data_ptr<T>();
    args.h = h.data_ptr<T>();
    args.c = c.data_ptr<T>();
    args.grad_grad = grad_grad.data_ptr<T>();
    args.grad_h = grad_h.data_ptr<T>();
    args.grad_c = grad_c.data_ptr<T>();
    args.partials = partials.data_ptr<T>();
    const size_t static_bytes = 2 * kChunk * (kTile + 1) * sizeof(T);
    const size_t weight_bytes = static_cast<size_t>(args.net.packed_total) * sizeof(T);
    const bool shared = static_bytes + weight_bytes <= kSmemLimit;
    auto kernel = pick_kernel(small_hidden(shape), shared,
                              coordinate_lstm_backward_kernel<T, kSmallHidden, true>,
                              coordinate_lstm_backward_kernel<T, kSmallHidden, false>,
                              coordinate_lstm_backward_kernel<T, kLstmMaxHidden, true>,
                              coordinate_lstm_backward_kernel<T, kLstmMaxHidden, false>);
    kernel<<<blocks, kTile, shared ? weight_bytes : 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // With P = 0 there are no partials and the sums are zeros.
  finish.partials = blocks > 0 ? partials.data_ptr<T>() : nullptr;
  finish.blocks = blocks;
  coordinate_lstm_finish_kernel<T>
      <<<grid_for(total, kFinishThreads), kFinishThreads, 0, stream>>>(finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coordinate_lstm_forward_cuda(
    const at::Tensor& grad, const at::Tensor& params, const at::Tensor& h, const at::Tensor& c,
    at::TensorList w_ih, at::TensorList w_hh, at::TensorList bias,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias,
    double preprocess_p, double output_scale) {
  const LstmShape shape = check_coordinate_lstm_args(grad, params, h, c, w_ih, w_hh, bias,
                                                     head_weight, head_bias, preprocess_p,
                                                     output_scale);
  device_error_record(grad);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor params_out = at::empty({shape.P}, grad.options());
  at::Tensor h_out = at::empty({shape.P, shape.width}, grad.options());
  at::Tensor c_out = at::empty({shape.P, shape.width}, grad.options());
  if (shape.P == 0) return {params_out, h_out, c_out};

  const at::Tensor g = grad.contiguous();
  const at::Tensor th = params.contiguous();
  const at::Tensor hc = h.contiguous();
  const at::Tensor cc = c.contiguous();
  const std::vector<at::Tensor> wi = contiguous_all(w_ih);
  const std::vector<at::Tensor> wh = contiguous_all(w_hh);
  const std::vector<at::Tensor> b = contiguous_all(bias);
  const at::Tensor hw = contiguous_or_undefined(head_weight);
  const at::Tensor hb = contiguous_or_undefined(head_bias);
  // fp32 or fp64: check_coordinate_lstm_args admits nothing else, for grad
  // and, through grad's dtype, for every other tensor.
  dispatch_fp32_fp64(g, "grad", [&]<typename T>() {
    launch_forward<T>(shape, g, th, hc, cc, wi, wh, b, hw, hb, preprocess_p, output_scale,
                      params_out, h_out, c_out);
  });
  return {params_out, h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, at::Tensor, at::Tensor>
coordinate_lstm_backward_cuda(const at::Tensor& grad_params_out,
                              const std::optional<at::Tensor>& grad_h_out,
                              const std::optional<at::Tensor>& grad_c_out,
                              const at::Tensor& grad, const at::Tensor& h, const at::Tensor& c,
                              at::TensorList w_ih, at::TensorList w_hh, at::TensorList bias,
                              const std::optional<at::Tensor>& head_weight,
                              const std::optional<at::Tensor>& head_bias, double preprocess_p,
                              double output_scale) {
  // grad stands in for params, which the backward does not take.
  const LstmShape shape = check_coordinate_lstm_args(grad, grad, h, c, w_ih, w_hh, bias,
                                                     head_weight, head_bias, preprocess_p,
                                                     output_scale);
  check_coordinate_lstm_backward_args(grad_params_out, grad_h_out, grad_c_out, grad, h);
  device_error_record(grad);  // raises what an earlier kernel recorded
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto opts = grad.options();
  at::Tensor grad_grad = at::empty({shape.P}, opts);
  at::Tensor grad_h = at::empty({shape.P, shape.width}, opts);
  at::Tensor grad_c = at::empty({shape.P, shape.width}, opts);
  std::vector<at::Tensor> grad_w_ih, grad_w_hh, grad_bias;
  for (int l = 0; l < shape.layers; ++l) {
    grad_w_ih.push_back(at::empty({4 * shape.hidden[l], shape.input[l]}, opts));
    grad_w_hh.push_back(at::empty({4 * shape.hidden[l], shape.hidden[l]}, opts));
    grad_bias.push_back(at::empty({4 * shape.hidden[l]}, opts));
  }
  at::Tensor grad_head_weight =
      shape.head ? at::empty({1, shape.hidden[shape.layers - 1]}, opts) : at::empty({0}, opts);
  at::Tensor grad_head_bias = shape.head ? at::empty({1}, opts) : at::empty({0}, opts);

  const at::Tensor gp = grad_params_out.contiguous();
  const at::Tensor gh = contiguous_or_undefined(grad_h_out);
  const at::Tensor gc = contiguous_or_undefined(grad_c_out);
  const at::Tensor g = grad.contiguous();
  const at::Tensor hc = h.contiguous();
  const at::Tensor cc = c.contiguous();
  const std::vector<at::Tensor> wi = contiguous_all(w_ih);
  const std::vector<at::Tensor> wh = contiguous_all(w_hh);
  const std::vector<at::Tensor> b = contiguous_all(bias);
  const at::Tensor hw = contiguous_or_undefined(head_weight);
  const at::Tensor hb = contiguous_or_undefined(head_bias);
  // The weight gradients are written even for P = 0 (zeros), so always launch.
  dispatch_fp32_fp64(g, "grad", [&]<typename T>() {
    launch_backward<T>(shape, gp, gh, gc, g, hc, cc, wi, wh, b, hw, hb, preprocess_p,
                       output_scale, grad_grad, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias,
                       grad_head_weight, grad_head_bias);
  });
  return {grad_grad,
          grad_h,
          grad_c,
          std::move(grad_w_ih),
          std::move(grad_w_hh),
          std::move(grad_bias),
          grad_head_weight,
          grad_head_bias};
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("coordinate_lstm_forward", &distillkit::coordinate_lstm_forward_cuda);
  m.impl("coordinate_lstm_backward", &distillkit::coordinate_lstm_backward_cuda);
}
