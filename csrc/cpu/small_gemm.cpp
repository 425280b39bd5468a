// The register-blocked GEMM of cpu/small_gemm.h. The flags of the ISA build
// (setup.py) pick the register tile, as for every CPU kernel.
#include "cpu/small_gemm.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace distillkit::cpu::inline CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Register tile of the microkernel: MR rows x NV vectors of accumulators
// (+ NV loaded B vectors + 1 broadcast) fit the 32 zmm (16 ymm) registers:
// 4 x 6 in general, 8 x 3 for narrow outputs (the backward's dX and dW of a
// small layer), where 4 rows would leave half the registers idle.
constexpr int kMR = 4;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kNV = 6;
constexpr int kMRNarrow = 8;
#else
constexpr int kNV = 3;
constexpr int kMRNarrow = 4;
#endif
static_assert(kSmallGemmRows % kMR == 0 && kSmallGemmNarrowRows % kMRNarrow == 0,
              "the documented row multiples give whole tiles");

// C[0:kMR, 0:NV V] = (accumulate ? C : 0) + Σ_{k<K} A(m, k) B[k, :], with
// A(m, k) = a[m sam + k sak]: the strides let one kernel read Ā as either
// operand layout (gates and dX: A row-major; dW: A = Āᵀ).
template <typename T, int MR, int NV>
void micro_tile(int64_t K, const T* a, int64_t sam, int64_t sak, const T* b, int64_t ldb, T* c,
                int64_t ldc, bool accumulate) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? Vec::loadu(c + i * ldc + j * V) : Vec(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = Vec::loadu(b + k * ldb + j * V);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec ai(a[i * sam + k * sak]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(ai, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j].store(c + i * ldc + j * V);
  }
}

template <typename T, int MR, int NV>
void tile_dispatch(int64_t nv, int64_t K, const T* a, int64_t sam, int64_t sak, const T* b,
                   int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if constexpr (NV > 1) {
    if (nv < NV) {
      tile_dispatch<T, MR, NV - 1>(nv, K, a, sam, sak, b, ldb, c, ldc, accumulate);
      return;
    }
  }
  micro_tile<T, MR, NV>(K, a, sam, sak, b, ldb, c, ldc, accumulate);
}

// Column panels of up to NV vectors outermost: a K x NV V panel of B stays in
// L1 while the rows stream past it in MR-row tiles.
template <typename T, int MR, int NV>
void gemm_panels(int64_t M, int64_t N, int64_t K, const T* a, int64_t sam, int64_t sak,
                 const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t V = Vectorized<T>::size();
  for (int64_t n0 = 0; n0 < N; n0 += NV * V) {
    const int64_t nv = std::min<int64_t>(NV, (N - n0) / V);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      tile_dispatch<T, MR, NV>(nv, K, a + m0 * sam, sam, sak, b + n0, ldb, c + m0 * ldc + n0, ldc,
                               accumulate);
    }
  }
}

}  // namespace

// 8-row tiles of up to 3 vectors where N is narrow; elsewhere they measured
// no faster than 4 x 6.
template <typename T>
void small_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t sam, int64_t sak, const T* b,
                int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t V = Vectorized<T>::size();
  if (M % kMRNarrow == 0 && N <= 3 * V) {
    gemm_panels<T, kMRNarrow, 3>(M, N, K, a, sam, sak, b, ldb, c, ldc, accumulate);
  } else {
    gemm_panels<T, kMR, kNV>(M, N, K, a, sam, sak, b, ldb, c, ldc, accumulate);
  }
}

template void small_gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                const float*, int64_t, float*, int64_t, bool);
template void small_gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                 const double*, int64_t, double*, int64_t, bool);

}  // namespace distillkit::cpu::inline CPU_CAPABILITY
