// matmul_into on the CPU. bf16 / fp16 operands into an fp32 out go to MKL's
// mixed-precision GEMMs (cblas_gemm_bf16bf16f32, AMX / AVX512-BF16 where the
// CPU has them), which accumulate in fp32 and add into out with beta = 1:
// fused linear KD sums its weight gradient over row chunks this way, with no
// product rounded to bf16, no (C, H) temporary and no separate conversion and
// add passes over it (benchmarks/results/fused_linear_profile.md). Same-dtype
// operands, and builds of torch without MKL, use ATen's matmuls.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "matmul_into.h"

// MKL's CBLAS (LP64: 32-bit ints), as libtorch_cpu exports it when torch is
// built with MKL. Weak: null when this torch has no MKL, and then not called.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace distillkit {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// An (R, S) operand as BLAS reads it: row-major (trans = kNoTrans, ld =
// stride 0) or column-major (kTrans, ld = stride 1); false for other strides.
bool blas_layout(const at::Tensor& t, int& trans, int64_t& ld) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 || cols == 1) {
    trans = kNoTrans;
    ld = rows == 1 ? std::max<int64_t>(cols, 1) : t.stride(0);
    return ld >= std::max<int64_t>(cols, 1);
  }
  if (t.stride(0) == 1 || rows == 1) {
    trans = kTrans;
    ld = cols == 1 ? std::max<int64_t>(rows, 1) : t.stride(1);
    return ld >= std::max<int64_t>(rows, 1);
  }
  return false;
}

void matmul_into_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                     bool accumulate) {
  check_matmul_into_args(out, a, b);
  const auto gemm = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32
                    : a.scalar_type() == at::kHalf   ? cblas_gemm_f16f16f32
                                                     : nullptr;
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  if (out.scalar_type() == a.scalar_type() || gemm == nullptr || m == 0 || n == 0) {
    matmul_into_aten(out, a, b, accumulate);
    return;
  }
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  int ta = 0, tb = 0, tc = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  at::Tensor ac = a, bc = b;
  if (!blas_layout(ac, ta, lda)) blas_layout(ac = a.contiguous(), ta, lda);
  if (!blas_layout(bc, tb, ldb)) blas_layout(bc = b.contiguous(), tb, ldb);
  // out is written in place: it must be row-major as it stands.
  const bool out_ok = blas_layout(out, tc, ldc) && tc == kNoTrans;
  if (!out_ok || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) ||
      !fits_int(ldb) || !fits_int(ldc)) {
    matmul_into_aten(out, a, b, accumulate);
    return;
  }
  gemm(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
       static_cast<const uint16_t*>(ac.const_data_ptr()), static_cast<int>(lda),
       static_cast<const uint16_t*>(bc.const_data_ptr()), static_cast<int>(ldb),
       accumulate ? 1.0f : 0.0f, out.mutable_data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("matmul_into", &matmul_into_cpu); }

}  // namespace distillkit
