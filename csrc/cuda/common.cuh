// Device helpers shared by the CUDA kernels: the accumulator type and pack
// width of an input pair, a row loop for groups of threads, accumulator math
// overloads, online log-sum-exp states, warp and block all-reductions, a row
// walker that turns a row into 16-byte packs plus a scalar head and tail, a
// block prefix count and a block radix select (the k-th largest key of a row).
//
// Reductions are all-reductions in a fixed order, so every thread of a row
// group ends with the bitwise-same value, and a row's result does not depend
// on scheduling (no floating-point atomics; the radix select's histogram
// uses integer atomics, whose counts do not depend on order).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace distillkit {
namespace device {

constexpr int kWarpSize = 32;

// The accumulator of an input type: double for fp64, float otherwise.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Elements per pack: 16-byte loads of the wider of two input types (the
// narrower one loads 8 bytes for mixed fp32/16-bit pairs).
template <typename S, typename U>
constexpr int pack_width() {
  return static_cast<int>(16 / std::max(sizeof(S), sizeof(U)));
}

// Row loop of a group of kRowThreads threads in a block of kBlockThreads:
// group g of block b starts at row b * groups + g and strides by the grid.
// The trip count is uniform over the group, so group-wide barriers inside
// the loop are safe.
template <int kBlockThreads, int kRowThreads>
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * (kBlockThreads / kRowThreads) +
         threadIdx.x / kRowThreads;
}

template <int kBlockThreads, int kRowThreads>
__device__ __forceinline__ int64_t row_stride() {
  return static_cast<int64_t>(gridDim.x) * (kBlockThreads / kRowThreads);
}

// Accumulator math for float and double; the overload set the templates use.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float acc_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double acc_expm1(double x) { return expm1(x); }
// x - x is 0 exactly for finite x, NaN for inf and NaN (the same on the GPU
// and the host compilers, which disagree on where isfinite is declared).
template <typename T>
__device__ __forceinline__ bool acc_isfinite(T x) {
  return x - x == T(0);
}
__device__ __forceinline__ float acc_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double acc_abs(double x) { return fabs(x); }
// fmax/fmin ignore a NaN operand; callers that need NaN to propagate carry
// it through a sum instead (see OnlineLSE).
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float acc_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double acc_min(double a, double b) { return fmin(a, b); }

// A product the compiler may not fuse into an FMA with a following add, for
// merges that must round the same whichever argument comes first.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// w * x with 0 * anything = 0 (xlogy semantics): a zero probability times
// an infinite or NaN log-ratio contributes nothing.
template <typename T>
__device__ __forceinline__ T xmul(T w, T x) {
  return w == T(0) ? T(0) : w * x;
}

// log(exp(a) + exp(b)) without overflow; -inf when both are -inf (where
// the naive max + log1p(exp(min - max)) would form -inf - -inf = NaN).
template <typename T>
__device__ __forceinline__ T log_add_exp(T a, T b) {
  const T hi = acc_max(a, b);
  const T lo = acc_min(a, b);
  return hi == neg_inf<T>() ? hi : hi + acc_log1p(acc_exp(lo - hi));
}

// Running log-sum-exp of a stream of values x, plus a weighted sum of side
// values d under the same weights:
//   s = sum exp(x - m),   a = sum exp(x - m) * d,   m = running max of x.
// So a / s = sum softmax(x) * d without a second pass. A plain struct (no
// default member initializers) so that it can live in __shared__ memory.
template <typename T>
struct OnlineLSE {
  T m;
  T s;
  T a;

  static __device__ __forceinline__ OnlineLSE empty() {
    return {neg_inf<T>(), T(0), T(0)};
  }

  // exp(x - ref) for the reference point of max `mx`. An all -inf prefix
  // has mx = -inf; using 0 as the reference there keeps exp(-inf - ref) = 0
  // instead of exp(-inf - -inf) = NaN.
  static __device__ __forceinline__ T reference(T mx) {
    return mx == neg_inf<T>() ? T(0) : mx;
  }

  // Moves the running max to cover `mx`, rescaling s and a, and returns
  // the reference point the new values must be exponentiated against.
  __device__ __forceinline__ T rebase(T mx) {
    const T m_new = acc_max(m, mx);
    const T ref = reference(m_new);
    const T scale = acc_exp(m - ref);
    s *= scale;
    // A weight that underflowed to 0 drops its (possibly infinite) term,
    // as it would have been dropped had the max been known up front.
    a = xmul(scale, a);
    m = m_new;
    return ref;
  }

  // Adds N values with one rescale per pack rather than one per value.
  // A NaN x makes s NaN (fmax skips it, exp does not), so it propagates.
  template <int N>
  __device__ __forceinline__ void add(const T (&x)[N]) {
    T mx = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = acc_max(mx, x[i]);
    const T ref = rebase(mx);
#pragma unroll
    for (int i = 0; i < N; ++i) s += acc_exp(x[i] - ref);
  }

  template <int N>
  __device__ __forceinline__ void add_weighted(const T (&x)[N], const T (&d)[N]) {
    T mx = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = acc_max(mx, x[i]);
    const T ref = rebase(mx);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const T w = acc_exp(x[i] - ref);
      s += w;
      a += xmul(w, d[i]);
    }
  }

  __device__ __forceinline__ T lse() const { return m + acc_log(s); }
};

// Symmetric in its arguments, bitwise: the butterfly reduction below merges
// (x, y) on one lane and (y, x) on its partner, and both must agree, hence
// unfused products (fma(x.s, ex, y.s * ey) would round differently from
// fma(y.s, ey, x.s * ex)).
template <typename T>
__device__ __forceinline__ OnlineLSE<T> merge(const OnlineLSE<T>& x, const OnlineLSE<T>& y) {
  const T m = acc_max(x.m, y.m);
  const T ref = OnlineLSE<T>::reference(m);
  const T ex = acc_exp(x.m - ref);
  const T ey = acc_exp(y.m - ref);
  const T ax = ex == T(0) ? T(0) : mul_rn(ex, x.a);
  const T ay = ey == T(0) ? T(0) : mul_rn(ey, y.a);
  return {m, mul_rn(x.s, ex) + mul_rn(y.s, ey), ax + ay};
}

__device__ __forceinline__ float shfl_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
__device__ __forceinline__ double shfl_xor(double v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

template <typename T>
__device__ __forceinline__ OnlineLSE<T> shfl_xor(const OnlineLSE<T>& v, int mask) {
  return {shfl_xor(v.m, mask), shfl_xor(v.s, mask), shfl_xor(v.a, mask)};
}

// Butterfly all-reduce over the 32 lanes of a warp. V needs shfl_xor(V, int)
// and a commutative merge(V, V), found by argument-dependent lookup. All
// lanes must call it (full mask).
template <typename V>
__device__ __forceinline__ V warp_allreduce(V v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v = merge(v, shfl_xor(v, mask));
  return v;
}

// All-reduce over a group of kThreads threads that own one row: a warp
// (kThreads = 32), or the whole block (kThreads = blockDim.x; every thread
// of the block must call it). `smem` holds kThreads / 32 values and may be
// reused by the next call: the leading barrier waits for its readers.
template <int kThreads, typename V>
__device__ __forceinline__ V group_allreduce(V v, V* smem) {
  static_assert(kThreads % kWarpSize == 0, "a row group is whole warps");
  v = warp_allreduce(v);
  if constexpr (kThreads > kWarpSize) {
    const int warp = threadIdx.x / kWarpSize;
    __syncthreads();
    if (threadIdx.x % kWarpSize == 0) smem[warp] = v;
    __syncthreads();
    // Every thread merges the partials in the same order: same result on
    // all threads, no broadcast step.
    v = smem[0];
#pragma unroll
    for (int w = 1; w < kThreads / kWarpSize; ++w) v = merge(v, smem[w]);
  }
  return v;
}

// N consecutive elements loaded or stored in one instruction (N * sizeof(T)
// is at most 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads N elements at p (aligned to N elements) converted to the accumulator.
template <int N, typename T, typename A>
__device__ __forceinline__ void load_pack(const T* p, A (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<A>(pk.v[i]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Walks the columns [0, cols) of the row that starts at element offset
// `row_start` of its tensors, calling f(col, n) for n = 1 or n = kVec
// consecutive columns (n is a std::integral_constant). Rows of a C not
// divisible by kVec start mid-pack, so each row gets a scalar head up to its
// first aligned column, kVec-wide packs, then a scalar tail. `aligned`
// says that every tensor's base pointer is aligned to kVec elements; when
// it is false the whole row goes scalar. Thread `lane` of `lanes` takes
// every lanes-th pack (coalesced).
template <int kVec, typename F>
__device__ __forceinline__ void for_each_pack(
    int64_t row_start, int cols, bool aligned, int lane, int lanes, F&& f) {
  int head = cols;
  if (aligned) {
    const int phase = static_cast<int>(row_start % kVec);
    head = min(cols, (kVec - phase) % kVec);
  }
  const int packs = (cols - head) / kVec;
  const int tail = head + packs * kVec;
  for (int j = lane; j < head; j += lanes) f(j, std::integral_constant<int, 1>{});
  for (int i = lane; i < packs; i += lanes) {
    f(head + i * kVec, std::integral_constant<int, kVec>{});
  }
  for (int j = tail + lane; j < cols; j += lanes) f(j, std::integral_constant<int, 1>{});
}

// Exclusive prefix sum of one int per thread over the kThreads threads of the
// block, in thread order; `total` gets the block's sum. Every thread must call
// it. `smem` holds kThreads / 32 ints and may be reused by the next call.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int v, int* smem, int& total) {
  static_assert(kThreads % kWarpSize == 0, "a block is whole warps");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int inclusive = v;
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += y;
  }
  __syncthreads();  // the previous call's readers of smem are done
  if (lane == kWarpSize - 1) smem[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) {
    const int s = smem[w];
    before += w < warp ? s : 0;
    total += s;
  }
  return before + inclusive - v;
}

// Unsigned keys whose integer order is the order of non-negative floats
// (IEEE bit patterns of values >= 0 sort as integers). -0 maps to +0's key,
// since the two compare equal.
__device__ __forceinline__ uint32_t nonneg_key(float x) {
  return x == 0.0f ? 0u : __float_as_uint(x);
}
__device__ __forceinline__ uint64_t nonneg_key(double x) {
  return x == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(x));
}
__device__ __forceinline__ float key_value(uint32_t key) { return __uint_as_float(key); }
__device__ __forceinline__ double key_value(uint64_t key) {
  return __longlong_as_double(static_cast<long long>(key));
}

// The k-th largest (1-based, with multiplicity) of a multiset of unsigned
// keys spread over the threads of a block, by most-significant-digit radix
// select: each pass histograms, in shared memory, the next kDigitBits bits of
// the keys that match the digits chosen so far, and keeps the bin that holds
// the k-th largest. Deterministic: the result depends on counts only.
//
// A pass is begin_pass(); every thread calls count(key) for each of its keys
// (every key of the multiset once); end_pass(). All threads of the block take
// part in begin_pass/end_pass and leave with the same state. Keys must be
// below 2^key_bits; passes run until done(), ceil(key_bits / kDigitBits) of
// them. After the last pass, value() is the k-th largest key and rank() is
// k minus the number of keys above it (>= 1: how many copies of value() the
// k largest take). The multiset must hold at least k keys.
constexpr int kRadixDigitBits = 11;
constexpr int kRadixBins = 1 << kRadixDigitBits;

// The shared memory of a BlockRadixSelect, whatever its key type (so that
// selects over different keys can take turns on one buffer).
template <int kThreads>
struct RadixSelectShared {
  int hist[kRadixBins];
  int scan[kThreads / kWarpSize];
  int bin;
  int rank;
  int count;
};

template <typename Key, int kThreads>
struct BlockRadixSelect {
  static_assert(std::is_unsigned_v<Key>, "radix keys are unsigned");
  static constexpr int kKeyBits = 8 * sizeof(Key);
  static constexpr int kDigitBits = kRadixDigitBits;
  static constexpr int kBins = kRadixBins;
  static_assert(kBins % kThreads == 0, "every thread owns whole bins");
  static constexpr int kBinsPerThread = kBins / kThreads;
  using Shared = RadixSelectShared<kThreads>;

  Shared& sh;
  Key prefix;     // the digits chosen so far, in place; 0 below bit `hi`
  Key mask;       // the bits at and above `hi`
  int hi;         // the bits below hi are still undecided
  int lo;         // this pass's digit: bits [lo, hi)
  int k_rank;     // rank of the target among the keys that match prefix
  int bin_count;  // keys in the chosen bin of the last pass
  int total;      // keys that matched prefix in the last pass

  __device__ __forceinline__ BlockRadixSelect(Shared& shared, int key_bits, int k)
      : sh(shared), prefix(0), hi(key_bits), k_rank(k), bin_count(0), total(0) {
    mask = hi >= kKeyBits ? Key(0) : ~Key(0) << hi;
    lo = max(hi - kDigitBits, 0);
  }

  __device__ __forceinline__ bool done() const { return hi == 0; }
  __device__ __forceinline__ Key value() const { return prefix; }
  __device__ __forceinline__ int rank() const { return k_rank; }

  __device__ __forceinline__ void begin_pass() {
    // The previous pass's readers of hist passed end_pass's last barrier.
    for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
  }

  // The bin is bits [lo, lo + kDigitBits); in a last, narrower digit its top
  // bits are already decided (equal for every counted key), so the walk in
  // end_pass still sees the keys in order and prefix |= bin << lo keeps them.
  __device__ __forceinline__ void count(Key key) {
    if ((key & mask) == prefix) {
      atomicAdd(&sh.hist[static_cast<int>((key >> lo) & Key(kBins - 1))], 1);
    }
  }

  __device__ __forceinline__ void end_pass() {
    __syncthreads();  // the histogram is complete
    // Thread i owns the bins kBins-1-i*P down to kBins-(i+1)*P (P bins per
    // thread), so thread order is descending key order and an exclusive
    // scan gives each thread the number of keys above its bins.
    const int top = kBins - 1 - static_cast<int>(threadIdx.x) * kBinsPerThread;
    int c[kBinsPerThread];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      c[j] = sh.hist[top - j];
      sum += c[j];
    }
    int above = block_exclusive_scan<kThreads>(sum, sh.scan, total);
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      // Exactly one bin holds the k_rank-th largest when k_rank <= total.
      if (above < k_rank && k_rank <= above + c[j]) {
        sh.bin = top - j;
        sh.rank = k_rank - above;
        sh.count = c[j];
      }
      above += c[j];
    }
    __syncthreads();
    prefix |= static_cast<Key>(sh.bin) << lo;
    k_rank = sh.rank;
    bin_count = sh.count;
    hi = lo;
    mask = ~Key(0) << lo;
    lo = max(hi - kDigitBits, 0);
  }
};

}  // namespace device
}  // namespace distillkit
