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

// Validates shapes, dtypes and devices of every argument, alpha in (0, 1],
// k in [1, C] (>= 2 when normalized), and (forward only) teacher rows that are
// non-negative and sum to 1 within 1e-3 (fp32/fp64) or 1e-2 (bf16/fp16).
SlamLossParams check_slam_loss_args(const at::Tensor& student_logits,
                                    const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                    const at::Tensor& k, bool normalized, bool hard,
                                    bool check_values);

void check_slam_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& stats,
                                   const at::Tensor& student_logits,
                                   const SlamLossParams& params);

}  // namespace distillkit
