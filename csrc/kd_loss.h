// Host-side pieces shared by the CPU and CUDA kd_loss kernels: argument
// checks and the params struct the kernels read. The per-row stats that the
// backward reads are laid out in stats_layout.h.
//
// Per row, with zs = z/T, us = u/T, q = softmax(zs), p = softmax(us):
//   forward KL:  D_teacher = KL(p||q)                 D_student = 0
//   reverse KL:  D_student = KL(q||p)                 D_teacher = 0
//   JSD(beta):   D_teacher = sum p (log p - log m)    D_student = sum q (log q - log m)
//   loss = (1 - hard_weight) * soft_scale * soft + hard_weight * (lse(z) - z_y),
// where soft = D_teacher (forward), D_student (reverse) or
// beta*D_teacher + (1-beta)*D_student (JSD), soft_scale = T^2 or 1, and rows
// whose label is ignore_index have loss 0 and zero gradient.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace distillkit {

// The cancellation-free divergences (docs/math.md §1.5). Where p ~ q (a large
// temperature, near-identical models) sum p (log p - log q) is a difference of
// terms far larger than the result: the one-pass form's error is eps |lse|
// against a divergence of order spread^2. A row whose one-pass divergence is
// below kStableRatio times the magnitudes that cancel in it takes another pass
// that sums non-negative terms only (so the one-pass relative error stays
// below about 4 eps / kStableRatio). With a base distribution b = softmax(x),
// the other a = softmax(y), any reference c and e = (y - x) - c:
//   X = E_b[expm1(e)],  W = E_b[w(e)],  w(e) = 1 + (e - 1) e^e >= 0,
//   KL(a||b) = W / (1 + X) + X / (1 + X) - log1p(X),
//   lse(y) - lse(x) = c + log1p(X)   (so log a - log b to full precision),
// and, with rp = log p - log q, JSD's KL(p||m) = E_p[phi((1 - beta) expm1(-rp))]
// and KL(q||m) = E_q[phi(beta expm1(rp))], phi(y) = y - log1p(y) >= 0.
inline constexpr double kStableRatio = 1.0 / 256;

// Series of w(e) = sum_{n >= 2} (n - 1) / n! e^n for |e| <= 1/2 (coefficient
// n - 2 of kTerms) and of phi(y) = y s - 2 s^3 sum_j s^(2j) / (2j + 3),
// s = y / (2 + y), for |y| <= 1/2: enough terms for fp64 (fp32 uses fewer).
template <int kTerms>
struct RatioWeightSeries {
  double c[kTerms] = {};
  constexpr RatioWeightSeries() {
    double fact = 1;
    for (int n = 2; n < kTerms + 2; ++n) {
      fact *= n;
      c[n - 2] = (n - 1) / fact;
    }
  }
};
inline constexpr int kRatioWeightTerms64 = 19, kRatioWeightTerms32 = 10;
inline constexpr int kLog1pGapTerms64 = 12, kLog1pGapTerms32 = 6;

// beta = 0 and beta = 1 of "jsd" resolve to the KL ends (docs/math.md §1.1).
enum class Divergence : int { ForwardKL = 0, ReverseKL = 1, JSD = 2 };

struct KDLossParams {
  int64_t rows;
  int64_t cols;
  double temperature;
  Divergence divergence;
  double beta;
  double hard_weight;
  // (1 - hard_weight) * (T^2 or 1): the factor on the soft term.
  double soft_scale;
  int64_t ignore_index;
  bool has_labels;
  bool hard;  // has_labels && hard_weight > 0
};

// Validates every argument of kd_loss_forward / kd_loss_backward (shapes,
// dtypes, devices, scalar ranges) and resolves them into the params the
// kernels use. Throws ValueError naming the offending argument. Label values
// are the kernels' to check where they read them (input_errors.h); the CPU
// forward checks them first (cpu_value_checks.h).
KDLossParams check_kd_loss_args(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    c10::string_view divergence,
    double beta,
    double hard_weight,
    int64_t ignore_index,
    bool scale_by_t2);

// grad_scale of kd_loss_forward_grad: (rows,) or 0-d (every row), in the
// accumulation type of student_logits and on its device. Its values are
// read only by the kernels (on CUDA, on the device).
void check_kd_loss_grad_scale(const std::optional<at::Tensor>& grad_scale,
                              const at::Tensor& student_logits, int64_t rows);

// kd_loss_scale_grad: unit_grad (N, C) floating; grad_rows (N,) or 0-d in its
// accumulation type, on its device.
void check_kd_loss_scale_grad_args(const at::Tensor& unit_grad, const at::Tensor& grad_rows);
// kd_loss_scale_grad_: the same, and grad contiguous (scaled in place).
void check_kd_loss_scale_grad_in_place_args(const at::Tensor& grad, const at::Tensor& grad_rows);

void check_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const KDLossParams& params);

}  // namespace distillkit
