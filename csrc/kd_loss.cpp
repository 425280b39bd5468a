#include "kd_loss.h"

#include <string>

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

static Divergence parse_divergence(c10::string_view name, double beta) {
  if (name == "forward_kl") return Divergence::ForwardKL;
  if (name == "reverse_kl") return Divergence::ReverseKL;
  if (name == "jsd") {
    if (beta == 0.0) return Divergence::ForwardKL;
    if (beta == 1.0) return Divergence::ReverseKL;
    return Divergence::JSD;
  }
  DK_CHECK(false, "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd' (got '",
           std::string(name), "')");
  return Divergence::ForwardKL;
}

KDLossParams check_kd_loss_args(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    c10::string_view divergence,
    double beta,
    double hard_weight,
    int64_t ignore_index,
    bool scale_by_t2) {
  DK_CHECK_DIM(student_logits, "student_logits", 2);
  DK_CHECK_DIM(teacher_logits, "teacher_logits", 2);
  DK_CHECK_FLOATING(student_logits, "student_logits");
  DK_CHECK_FLOATING(teacher_logits, "teacher_logits");
  DK_CHECK_SAME_DEVICE(teacher_logits, "teacher_logits", student_logits, "student_logits");
  const bool s64 = student_logits.scalar_type() == at::kDouble;
  const bool t64 = teacher_logits.scalar_type() == at::kDouble;
  DK_CHECK(s64 == t64, "teacher_logits and student_logits must both be fp64 or both be "
           "fp32/bf16/fp16 (got ", teacher_logits.scalar_type(), " and ",
           student_logits.scalar_type(), ")");
  DK_CHECK(teacher_logits.size(0) == student_logits.size(0),
           "teacher_logits must have as many rows as student_logits (got ",
           teacher_logits.size(0), " and ", student_logits.size(0), ")");
  DK_CHECK(teacher_logits.size(1) == student_logits.size(1),
           "teacher_logits must have the same last dimension as student_logits (got ",
           teacher_logits.size(1), " and ", student_logits.size(1), ")");
  // C = 0 has no distribution to compare, whatever N (N = 0 rows are fine).
  DK_CHECK(student_logits.size(1) >= 1, "student_logits must have at least one class (got "
           "shape ", student_logits.sizes(), ")");
  check_temperature(temperature);
  DK_CHECK(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1] (got ", beta, ")");
  DK_CHECK(hard_weight >= 0.0 && hard_weight <= 1.0,
           "hard_weight must be in [0, 1] (got ", hard_weight, ")");

  KDLossParams p;
  p.rows = student_logits.size(0);
  p.cols = student_logits.size(1);
  p.temperature = temperature;
  p.divergence = parse_divergence(divergence, beta);
  p.beta = beta;
  p.hard_weight = hard_weight;
  p.soft_scale = (1.0 - hard_weight) * (scale_by_t2 ? temperature * temperature : 1.0);
  p.ignore_index = ignore_index;
  p.has_labels = labels.has_value();
  p.hard = p.has_labels && hard_weight > 0.0;
  DK_CHECK(p.has_labels || hard_weight == 0.0,
           "hard_weight > 0 needs labels (got hard_weight=", hard_weight,
           " and labels=None)");
  if (p.has_labels) check_row_labels(*labels, p.rows, student_logits);
  return p;
}

void check_kd_loss_grad_scale(const std::optional<at::Tensor>& grad_scale,
                              const at::Tensor& student_logits, int64_t rows) {
  if (!grad_scale.has_value()) return;
  const at::Tensor& g = *grad_scale;
  const auto acc = acc_scalar_type(student_logits);
  DK_CHECK(g.dim() == 0 || (g.dim() == 1 && g.size(0) == rows),
           "grad_scale must have shape (", rows, ",) or be 0-d (got ", g.sizes(), ")");
  DK_CHECK(g.scalar_type() == acc, "grad_scale must be ", acc, " (got ", g.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(g, "grad_scale", student_logits, "student_logits");
}

void check_kd_loss_scale_grad_args(const at::Tensor& unit_grad, const at::Tensor& grad_rows) {
  DK_CHECK_DIM(unit_grad, "unit_grad", 2);
  DK_CHECK_FLOATING(unit_grad, "unit_grad");
  const int64_t rows = unit_grad.size(0);
  const auto acc = acc_scalar_type(unit_grad);
  DK_CHECK(grad_rows.dim() == 0 || (grad_rows.dim() == 1 && grad_rows.size(0) == rows),
           "grad_rows must have shape (", rows, ",) or be 0-d (got ", grad_rows.sizes(), ")");
  DK_CHECK(grad_rows.scalar_type() == acc, "grad_rows must be ", acc, " (got ",
           grad_rows.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(grad_rows, "grad_rows", unit_grad, "unit_grad");
}

void check_kd_loss_scale_grad_in_place_args(const at::Tensor& grad, const at::Tensor& grad_rows) {
  check_kd_loss_scale_grad_args(grad, grad_rows);
  DK_CHECK(grad.is_contiguous(), "grad must be contiguous (got strides ", grad.strides(), ")");
}

void check_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const KDLossParams& params) {
  check_row_backward_args(grad_loss, stats, student_logits, params.rows, kd_loss_stats::kCols);
}

}  // namespace distillkit
