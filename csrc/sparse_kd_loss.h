// Host-side pieces shared by the CPU and CUDA sparse_kd_loss kernels (docs/math.md
// §4): argument checks, the params struct the kernels read.
//
// The teacher is given per row as K kept classes I (int64, -1 = padding) and
// their log-probabilities l (already at temperature T). With the kept set
// V = {k : I_k >= 0}, lse_t = log sum_{k in V} exp(l_k) and
//   renormalize:  log p_k = l_k - lse_t   (the tail's mass is dropped)
//   otherwise:    log p_k = l_k           (raw kept probabilities)
// and q = softmax(z/T) over all C classes, the row loss is
//   soft_scale * sum_{k in V} p_k (log p_k - log q_{I_k}),
//   d/dz_j = soft_scale / T * (q_j * sum_k p_k - sum_k p_k [I_k = j]).
// The per-row stats that the backward reads are laid out in stats_layout.h.
// A row is dead (loss 0, gradient 0) when its label is ignore_index or it has
// no kept entry; dead rows have all-zero stats, and a kept mass of 0 also
// tells the backward to write zeros.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace distillkit {

struct SparseKDLossParams {
  int64_t rows;
  int64_t cols;  // C, the student's classes
  int64_t k;     // kept teacher entries per row
  double temperature;
  bool renormalize;
  double soft_scale;  // T^2 or 1
  int64_t ignore_index;
  bool has_labels;
};

// Validates every argument of sparse_kd_loss_forward / _backward (shapes,
// dtypes, devices, temperature) and resolves them into the params the
// kernels use. Throws ValueError naming the offending argument. Index values
// (in [0, C) or -1, no class twice in a row) are the kernels' to check where
// they read them (input_errors.h); the CPU forward checks them first
// (cpu_value_checks.h).
SparseKDLossParams check_sparse_kd_loss_args(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2);

void check_sparse_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const SparseKDLossParams& params);

}  // namespace distillkit
