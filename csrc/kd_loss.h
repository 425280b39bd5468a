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

void check_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const KDLossParams& params);

}  // namespace distillkit
