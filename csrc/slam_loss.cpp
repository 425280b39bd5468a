#include "slam_loss.h"

#include <algorithm>

#include <ATen/ops/abs.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

SlamLossParams check_slam_loss_args(const at::Tensor& student_logits,
                                    const at::Tensor& teacher_probs, const at::Tensor& alpha,
                                    const at::Tensor& k, bool normalized, bool hard,
                                    bool check_values) {
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
  DK_CHECK(alpha.dim() == 1 && alpha.size(0) == p.rows, "alpha must have shape (", p.rows,
           ",) (got ", alpha.sizes(), ")");
  DK_CHECK(alpha.scalar_type() == acc_scalar_type(student_logits), "alpha must be ",
           acc_scalar_type(student_logits), " (got ", alpha.scalar_type(), ")");
  DK_CHECK(k.dim() == 1 && k.size(0) == p.rows, "k must have shape (", p.rows, ",) (got ",
           k.sizes(), ")");
  DK_CHECK(k.scalar_type() == at::kLong, "k must be int64 (got ", k.scalar_type(), ")");
  if (!check_values || p.rows == 0) return p;

  // Host-side checks (one sync each on CUDA) rather than device asserts.
  int64_t bad = first_bad_row(at::logical_and(alpha.gt(0), alpha.le(1)));
  DK_CHECK(bad < 0, "alpha must be in (0, 1] (alpha[", bad, "] = ",
           bad < 0 ? 0.0 : alpha[bad].item<double>(), ")");
  const int64_t k_min = normalized ? 2 : 1;
  bad = first_bad_row(at::logical_and(k.ge(k_min), k.le(p.cols)));
  DK_CHECK(bad < 0, "k must be in [", k_min, ", ", p.cols, "]",
           normalized ? " (normalized=True needs k >= 2)" : "", " (k[", bad, "] = ",
           bad < 0 ? 0 : k[bad].item<int64_t>(), ")");
  const bool low = teacher_probs.scalar_type() == at::kHalf ||
                   teacher_probs.scalar_type() == at::kBFloat16;
  const double tol = low ? 1e-2 : 1e-3;
  // Row blocks bound any temporaries of the reductions to a few MiB; sums
  // accumulate in fp32 (fp64 for fp64), far below the tolerance.
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 23) / std::max<int64_t>(p.cols, 1));
  for (int64_t r0 = 0; r0 < p.rows; r0 += block) {
    const at::Tensor t = teacher_probs.narrow(0, r0, std::min(block, p.rows - r0));
    bad = first_bad_row(t.amin(1).ge(0));  // NaN fails too
    DK_CHECK(bad < 0, "teacher_probs must be non-negative (row ", r0 + bad,
             " has a negative or NaN entry)");
    const at::Tensor sums = t.sum(1, /*keepdim=*/false, acc_scalar_type(teacher_probs));
    bad = first_bad_row(at::abs(sums.sub(1.0)).le(tol));
    DK_CHECK(bad < 0, "teacher_probs rows must sum to 1 within ", tol, " (row ", r0 + bad,
             " sums to ", bad < 0 ? 0.0 : sums[bad].item<double>(), ")");
  }
  return p;
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
