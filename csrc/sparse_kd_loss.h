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
//
// With the teacher's tail (teacher_tail_logprob, lambda = log of its mass
// outside I) the row compares complete distributions over K + 1 buckets:
// teacher P_k = exp(l_k - N), P_tail = exp(lambda - N) (N = the lse over the
// K + 1 buckets when renormalizing, else 0); student Q_k = q_{I_k} and
// Q_tail = 1 - sum_k Q_k (its log from the sum, docs/math.md §4.1). The row is
// soft_scale * D(P, Q) for forward KL, reverse KL or JSD(beta); with
// G_b = dD/dQ_b and Gbar = sum_b G_b Q_b,
//   d/dz_j = soft_scale / T * q_j (G_{b(j)} - Gbar),  b(j) = j's bucket.
// The backward writes every column as soft_scale / T * (gamma q_j -
// exp(z_j/T - lse + rho)) (the tail classes' value; rho = -inf unless forward
// KL has a tail), then overwrites the kept classes.
// The per-row stats that the backward reads are laid out in stats_layout.h.
// A row is dead (loss 0, gradient 0) when its label is ignore_index or it has
// no kept entry; dead rows have all-zero stats, and a kept mass of 0 also
// tells the backward to write zeros.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "kd_loss.h"  // Divergence

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
  bool has_tail;  // teacher_tail_logprob given: K + 1 buckets
  Divergence divergence;  // ReverseKL and JSD only with the tail
  double beta;
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
    bool scale_by_t2,
    const std::optional<at::Tensor>& teacher_tail_logprob,
    c10::string_view divergence,
    double beta);

void check_sparse_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const SparseKDLossParams& params);

}  // namespace distillkit
