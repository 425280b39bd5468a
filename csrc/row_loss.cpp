#include "row_loss.h"

#include <cmath>

#include "checks.h"

namespace distillkit {

at::ScalarType acc_scalar_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_row_labels(const at::Tensor& labels, int64_t rows, const at::Tensor& student_logits) {
  DK_CHECK(labels.scalar_type() == at::kLong, "labels must be int64 (got ",
           labels.scalar_type(), ")");
  DK_CHECK(labels.dim() == 1 && labels.size(0) == rows,
           "labels must have shape (", rows, ",) to match the rows of "
           "student_logits (got ", labels.sizes(), ")");
  DK_CHECK_SAME_DEVICE(labels, "labels", student_logits, "student_logits");
}

void check_label_bound_args(const at::Tensor& labels, int64_t num_classes) {
  DK_CHECK(labels.scalar_type() == at::kLong, "labels must be int64 (got ",
           labels.scalar_type(), ")");
  DK_CHECK(labels.dim() == 1, "labels must be 1-D (got shape ", labels.sizes(), ")");
  DK_CHECK(num_classes >= 1, "num_classes must be >= 1 (got ", num_classes, ")");
}

void check_temperature(double temperature) {
  DK_CHECK(std::isfinite(temperature) && temperature > 0.0,
           "temperature must be finite and > 0 (got ", temperature, ")");
}

void check_row_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    int64_t rows,
    int64_t stats_cols) {
  const auto acc = acc_scalar_type(student_logits);
  DK_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows,
           "grad_loss must have shape (", rows, ",) (got ", grad_loss.sizes(), ")");
  DK_CHECK(grad_loss.scalar_type() == acc, "grad_loss must be ", acc, " (got ",
           grad_loss.scalar_type(), ")");
  DK_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == stats_cols,
           "stats must have shape (", rows, ", ", stats_cols, ") (got ",
           stats.sizes(), ")");
  DK_CHECK(stats.scalar_type() == acc, "stats must be ", acc, " (got ",
           stats.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(grad_loss, "grad_loss", student_logits, "student_logits");
  DK_CHECK_SAME_DEVICE(stats, "stats", student_logits, "student_logits");
}

}  // namespace distillkit
