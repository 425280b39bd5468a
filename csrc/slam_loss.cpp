#include "slam_loss.h"

#include <cstdint>
#include <limits>

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

SlamLossParams check_slam_loss_args(const at::Tensor& student_logits,
                                    const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                    const at::Tensor& k, bool normalized, bool hard) {
  DK_CHECK_DIM(student_logits, "student_logits", 2);
  DK_CHECK_DIM(teacher_probs, "teacher_probs", 2);
  DK_CHECK_FLOATING(student_logits, "student_logits");
  DK_CHECK_FLOATING(teacher_probs, "teacher_probs");
  DK_CHECK_SAME_DEVICE(teacher_probs, "teacher_probs", student_logits, "student_logits");
  DK_CHECK_SAME_DEVICE(alpha, "alpha", student_logits, "student_logits");
  DK_CHECK_SAME_DEVICE(k, "k", student_logits, "student_logits");
  DK_CHECK(teacher_probs.sizes() == student_logits.sizes(),
           "teacher_probs must have the shape of student_logits (got ", teacher_probs.sizes(),
           " and ", student_logits.sizes(), ")");
  const bool s64 = student_logits.scalar_type() == at::kDouble;
  DK_CHECK(s64 == (teacher_probs.scalar_type() == at::kDouble),
           "teacher_probs and student_logits must both be fp64 or both be fp32/bf16/fp16 (got ",
           teacher_probs.scalar_type(), " and ", student_logits.scalar_type(), ")");
  SlamLossParams p{student_logits.size(0), student_logits.size(1), normalized, hard};
  DK_CHECK(p.cols >= 1, "student_logits must have at least one class (got shape ",
           student_logits.sizes(), ")");
  // The argmax and the tie count are saved as int32 bits in fp32 stats.
  DK_CHECK(p.cols <= std::numeric_limits<int32_t>::max(), "student_logits must have at most ",
           std::numeric_limits<int32_t>::max(), " classes (got ", p.cols, ")");
  DK_CHECK(alpha.dim() == 1 && alpha.size(0) == p.rows, "alpha must have shape (", p.rows,
           ",) (got ", alpha.sizes(), ")");
  DK_CHECK(alpha.scalar_type() == acc_scalar_type(student_logits), "alpha must be ",
           acc_scalar_type(student_logits), " (got ", alpha.scalar_type(), ")");
  DK_CHECK(k.dim() == 1 && k.size(0) == p.rows, "k must have shape (", p.rows, ",) (got ",
           k.sizes(), ")");
  DK_CHECK(k.scalar_type() == at::kLong, "k must be int64 (got ", k.scalar_type(), ")");
  return p;
}

double teacher_sum_tolerance(at::ScalarType teacher_dtype) {
  return teacher_dtype == at::kHalf || teacher_dtype == at::kBFloat16 ? 1e-2 : 1e-3;
}

void check_slam_loss_backward_args(const at::Tensor& grad_loss, const at::Tensor& stats,
                                   const at::Tensor& student_logits,
                                   const SlamLossParams& params) {
  const auto acc = acc_scalar_type(student_logits);
  DK_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == params.rows &&
               grad_loss.scalar_type() == acc,
           "grad_loss must be a (", params.rows, ",) ", acc, " tensor (got ", grad_loss.sizes(),
           " ", grad_loss.scalar_type(), ")");
  DK_CHECK(stats.dim() == 2 && stats.size(0) == params.rows &&
               stats.size(1) == slam_loss_stats::kCols && stats.scalar_type() == acc,
           "stats must be a (", params.rows, ", ", slam_loss_stats::kCols, ") ", acc,
           " tensor (got ", stats.sizes(), " ", stats.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(grad_loss, "grad_loss", student_logits, "student_logits");
  DK_CHECK_SAME_DEVICE(stats, "stats", student_logits, "student_logits");
}

}  // namespace distillkit
