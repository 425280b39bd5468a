// Tiled, vectorized building blocks shared by the CPU kernels: rows stream
// through fixed-size tiles converted to the accumulation type (fp32, or fp64
// for fp64 input), so a row of any length costs a few L1-resident buffers and
// the math is written once per accumulation type whatever the input dtypes.
#pragma once
#if !defined(CPU_CAPABILITY)
#error "this header is for the kernel files that setup.py compiles once per CPU level"
#endif
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>


#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

namespace distillkit::cpu::inline CPU_CAPABILITY {

using at::vec::Vectorized;


// Elements per tile: two fp32 tiles take 16 KiB, well inside L1.
constexpr int64_t kTile = 2048;

template <typename acc_t>
using TileLoader = void (*)(const void* base, int64_t offset, int64_t n, acc_t scale, acc_t* dst);
template <typename acc_t>
using TileStorer = void (*)(const acc_t* src, int64_t n, void* base, int64_t offset);

// dst[0:n] = src[offset:offset+n] * scale in acc_t; the tail up to a whole
// vector is padded with -inf, which every formula below treats as a masked
// entry that contributes nothing.
template <typename scalar_t, typename acc_t>
void load_tile(const void* base, int64_t offset, int64_t n, acc_t scale, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  const scalar_t* src = static_cast<const scalar_t*>(base) + offset;
  const Vec vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v = Vec::loadu(src + i);
    } else {
      at::vec::load_to_float<scalar_t>(src + i, v);
    }
    (v * vscale).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * scale;
  for (; i % Vec::size() != 0; ++i) dst[i] = -std::numeric_limits<acc_t>::infinity();
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, int64_t n, void* base, int64_t offset) {
  scalar_t* dst = static_cast<scalar_t*>(base) + offset;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// The dtype is resolved once per call into a loader/storer; the kernels are
// templates on the accumulation type only, so mixed student/teacher dtypes
// cost no extra instantiations and the per-tile indirect call is negligible.
template <typename acc_t>
TileLoader<acc_t> loader_for(at::ScalarType t) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return &load_tile<double, double>;
  } else {
    switch (t) {
      case at::kFloat: return &load_tile<float, float>;
      case at::kBFloat16: return &load_tile<at::BFloat16, float>;
      case at::kHalf: return &load_tile<at::Half, float>;
      default: TORCH_CHECK(false, "distillkit: unsupported dtype ", t);
    }
  }
}

template <typename acc_t>
TileStorer<acc_t> storer_for(at::ScalarType t) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return &store_tile<double, double>;
  } else {
    switch (t) {
      case at::kFloat: return &store_tile<float, float>;
      case at::kBFloat16: return &store_tile<at::BFloat16, float>;
      case at::kHalf: return &store_tile<at::Half, float>;
      default: TORCH_CHECK(false, "distillkit: unsupported dtype ", t);
    }
  }
}

// Direct vector I/O for kernels that stream their inputs once, elementwise:
// one step is two accumulation vectors, converted in registers (a 16-bit
// type loads and stores as one full vector of its own), so no tile buffer
// sits between memory and the math.
template <typename scalar_t, typename acc_t>
struct VecIo {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }

  static void store(scalar_t* p, Vec a, Vec b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }

  // A last step of n < kStep elements: missing lanes read as 0, are not written.
  static void load_partial(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    alignas(64) scalar_t buf[kStep] = {};
    std::copy(p, p + n, buf);
    load(buf, a, b);
  }

  static void store_partial(scalar_t* p, int64_t n, Vec a, Vec b) {
    alignas(64) scalar_t buf[kStep];
    store(buf, a, b);
    std::copy(buf, buf + n, p);
  }
};

template <typename acc_t>
acc_t reduce_max(Vectorized<acc_t> v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t m = buf[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) m = std::max(m, buf[i]);
  return m;
}

template <typename acc_t>
acc_t reduce_sum(Vectorized<acc_t> v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += buf[i];
  return s;
}

template <typename acc_t>
Vectorized<acc_t> vexp(Vectorized<acc_t> v) {
  // exp_u20 (max 2 ulp) is a few times cheaper than the 1-ulp Sleef exp and
  // well below the tolerance of a loss accumulated over C terms.
  return v.exp_u20();
}

// weight * diff, but 0 where weight == 0: the xlogy rule. A zero probability
// (a -inf logit, or one that underflowed) contributes nothing even where diff
// is infinite or NaN (log 0 - log 0).
template <typename acc_t>
Vectorized<acc_t> masked_term(Vectorized<acc_t> weight, Vectorized<acc_t> diff) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(weight * diff, Vec(0), weight == Vec(0));
}

// Rows per task: enough elements that scheduling overhead stays negligible.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// Only the class dimension must be contiguous; row strides are honoured, so
// slices such as logits[:, :V] need no copy.
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

}  // namespace distillkit::cpu::inline CPU_CAPABILITY
