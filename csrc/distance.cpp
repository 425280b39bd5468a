#include "distance.h"

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

void check_distance_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t dims) {
  if (dims >= 0) {
    DK_CHECK_DIM(student, "student", dims);
  }
  DK_CHECK_FLOATING(student, "student");
  DK_CHECK_FLOATING(teacher, "teacher");
  DK_CHECK_SAME_DEVICE(teacher, "teacher", student, "student");
  DK_CHECK(teacher.sizes() == student.sizes(), "teacher must have the shape of student (got ",
           teacher.sizes(), " and ", student.sizes(), ")");
  DK_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
           "teacher and student must both be fp64 or both be fp32/bf16/fp16 (got ",
           teacher.scalar_type(), " and ", student.scalar_type(), ")");
}

PointwiseOp parse_pointwise_op(c10::string_view op) {
  if (op == "l1") return PointwiseOp::L1;
  if (op == "l2") return PointwiseOp::L2;
  if (op == "smooth_l1") return PointwiseOp::SmoothL1;
  DK_CHECK(false, "op must be one of 'l1', 'l2', 'smooth_l1' (got '", std::string(op), "')");
  return PointwiseOp::L1;
}

void check_correlation_distance_backward_args(const at::Tensor& grad_rows,
                                              const at::Tensor& stats,
                                              const at::Tensor& student) {
  const auto acc = acc_scalar_type(student);
  const int64_t outer = student.size(0), inner = student.size(2);
  DK_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == outer && grad_rows.size(1) == inner &&
               grad_rows.scalar_type() == acc,
           "grad_rows must be a (", outer, ", ", inner, ") ", acc, " tensor (got ",
           grad_rows.sizes(), " ", grad_rows.scalar_type(), ")");
  DK_CHECK(stats.dim() == 3 && stats.size(0) == outer && stats.size(1) == inner &&
               stats.size(2) == correlation_distance_stats::kCols && stats.scalar_type() == acc,
           "stats must be a (", outer, ", ", inner, ", ", correlation_distance_stats::kCols, ") ",
           acc, " tensor (got ", stats.sizes(), " ", stats.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(grad_rows, "grad_rows", student, "student");
  DK_CHECK_SAME_DEVICE(stats, "stats", student, "student");
}

}  // namespace distillkit
