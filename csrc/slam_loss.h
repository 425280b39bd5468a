// Host-side pieces shared by the CPU and CUDA slam_loss kernels (docs/math.md §5).
//
// Per row, with f = softmax(z), teacher t, top-k mask M of t (ties broken by
// the lower class index), c = 1 or 1/(k-1) (normalized), a = alpha - (1-alpha) c:
//   q_i = alpha f_i                 (M_i = 0)   log q_i = log alpha + z_i - lse
//   q_i = (1-alpha) c + a f_i       (M_i = 1)
//   loss = -sum_i t_i log q_i  (soft)   or   -log q_yhat, yhat = argmax t (hard)
//   h_i = M_i ? -t_i f_i a / q_i : -t_i,   S = sum_i h_i,   dz_j = h_j - f_j S
// M = {i : t_i > thr} plus the first `ties` indices with t_i == thr, thr the
// k-th largest t. The per-row stats that the backward reads (thr and ties
// among them) are laid out in stats_layout.h.
#pragma once
#include <ATen/core/Tensor.h>

namespace distillkit {

struct SlamLossParams {
  int64_t rows;
  int64_t cols;
  bool normalized;
  bool hard;
};

// Validates shapes, dtypes and devices of every argument. The values (alpha
// in (0, 1], k in [1, C] (>= 2 when normalized), teacher rows non-negative
// and summing to 1 within teacher_sum_tolerance) are the kernels' to check
// where they read them (input_errors.h); the CPU forward checks them first
// (cpu_value_checks.h).
SlamLossParams check_slam_loss_args(const at::Tensor& student_logits,
                                    const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                    const at::Tensor& k, bool normalized, bool hard);

// How far a teacher row's sum may be from 1: 1e-3 (fp32/fp64) or 1e-2 (bf16/fp16).
double teacher_sum_tolerance(at::ScalarType teacher_dtype);

void check_slam_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& stats,
                                   const at::Tensor& student_logits,
                                   const SlamLossParams& params);

}  // namespace distillkit
