// A register-blocked GEMM on at::vec::Vectorized for the CPU kernels' small
// products (coordinate_lstm's gates, dX and dW: K and N a few hundred, M a
// block of rows), where a BLAS call costs more in dispatch and packing than
// it saves. Column panels of B stay in L1 while the rows of A stream past in
// register tiles sized for the ISA (small_gemm.cpp); every element of C is a
// chain of fused multiply-adds in k order, so it does not depend on the
// tiling.
#pragma once
#if !defined(CPU_CAPABILITY)
#error "this header is for the kernel files that setup.py compiles once per CPU level"
#endif
#include <cstdint>

namespace distillkit::cpu::inline CPU_CAPABILITY {

// M must be a multiple of kSmallGemmRows; a multiple of kSmallGemmNarrowRows
// also lets narrow outputs (N up to 3 vectors) take the taller tiles.
constexpr int64_t kSmallGemmRows = 4;
constexpr int64_t kSmallGemmNarrowRows = 8;

// C (M x N) (+)= A (M x K) · B (K x N): C = A B, or C += A B when accumulate,
// with A(m, k) = a[m sam + k sak] (the strides read A row-major or
// transposed), B row-major with leading dimension ldb and C with ldc. N must
// be a multiple of the vector size of T. T is float or double.
template <typename T>
void small_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t sam, int64_t sak, const T* b,
                int64_t ldb, T* c, int64_t ldc, bool accumulate);

extern template void small_gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                       const float*, int64_t, float*, int64_t, bool);
extern template void small_gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t,
                                        int64_t, const double*, int64_t, double*, int64_t, bool);

}  // namespace distillkit::cpu::inline CPU_CAPABILITY
