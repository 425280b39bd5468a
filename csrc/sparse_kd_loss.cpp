#include "sparse_kd_loss.h"

#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>

#include <tuple>

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

// Range (and duplicate) check of the N x K indices: a few N x K passes and
// one device-to-host sync, instead of a device assert, so that a bad index
// is a catchable error naming the argument and the offending entry.
static void check_index_values(const at::Tensor& idx, int64_t cols, bool check_duplicates) {
  if (idx.numel() == 0) return;
  const at::Tensor ok = at::logical_or(at::logical_and(idx.ge(0), idx.lt(cols)), idx.eq(-1));
  if (!ok.all().item<bool>()) {
    const at::Tensor bad = (~ok).nonzero()[0];
    const int64_t r = bad[0].item<int64_t>(), k = bad[1].item<int64_t>();
    DK_CHECK(false, "teacher_indices must be in [0, ", cols, ") or -1 for padding "
             "(teacher_indices[", r, ", ", k, "] = ", idx[r][k].item<int64_t>(), ")");
  }
  if (!check_duplicates || idx.size(1) < 2) return;
  // O(N K log K): sort each row, then compare neighbours; padding may repeat.
  const at::Tensor sorted = std::get<0>(idx.sort(1));
  const int64_t kk = idx.size(1);
  const at::Tensor next = sorted.narrow(1, 1, kk - 1);
  const at::Tensor dup = at::logical_and(next.eq(sorted.narrow(1, 0, kk - 1)), next.ge(0));
  if (dup.any().item<bool>()) {
    const at::Tensor bad = dup.nonzero()[0];
    const int64_t r = bad[0].item<int64_t>();
    DK_CHECK(false, "teacher_indices must not repeat a class within a row (row ", r,
             " holds class ", next[r][bad[1].item<int64_t>()].item<int64_t>(),
             " twice; pass check_duplicates=False only for indices known to be unique)");
  }
}

SparseKDLossParams check_sparse_kd_loss_args(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2,
    bool check_indices,
    bool check_duplicates) {
  DK_CHECK_DIM(student_logits, "student_logits", 2);
  DK_CHECK_DIM(teacher_indices, "teacher_indices", 2);
  DK_CHECK_DIM(teacher_logprobs, "teacher_logprobs", 2);
  DK_CHECK_FLOATING(student_logits, "student_logits");
  DK_CHECK_FLOATING(teacher_logprobs, "teacher_logprobs");
  DK_CHECK(teacher_indices.scalar_type() == at::kLong, "teacher_indices must be int64 (got ",
           teacher_indices.scalar_type(), ")");
  DK_CHECK_SAME_DEVICE(teacher_indices, "teacher_indices", student_logits, "student_logits");
  DK_CHECK_SAME_DEVICE(teacher_logprobs, "teacher_logprobs", student_logits, "student_logits");
  const bool s64 = student_logits.scalar_type() == at::kDouble;
  const bool t64 = teacher_logprobs.scalar_type() == at::kDouble;
  DK_CHECK(s64 == t64, "teacher_logprobs and student_logits must both be fp64 or both be "
           "fp32/bf16/fp16 (got ", teacher_logprobs.scalar_type(), " and ",
           student_logits.scalar_type(), ")");
  DK_CHECK(teacher_indices.size(0) == student_logits.size(0),
           "teacher_indices must have as many rows as student_logits (got ",
           teacher_indices.size(0), " and ", student_logits.size(0), ")");
  DK_CHECK(teacher_logprobs.sizes() == teacher_indices.sizes(),
           "teacher_logprobs must have the shape of teacher_indices (got ",
           teacher_logprobs.sizes(), " and ", teacher_indices.sizes(), ")");
  DK_CHECK(teacher_indices.size(1) >= 1, "teacher_indices must have at least one column (got "
           "shape ", teacher_indices.sizes(), ")");
  DK_CHECK(student_logits.size(1) >= 1 || student_logits.size(0) == 0,
           "student_logits must have at least one class (got shape ",
           student_logits.sizes(), ")");
  check_temperature(temperature);

  SparseKDLossParams p;
  p.rows = student_logits.size(0);
  p.cols = student_logits.size(1);
  p.k = teacher_indices.size(1);
  p.temperature = temperature;
  p.renormalize = renormalize;
  p.soft_scale = scale_by_t2 ? temperature * temperature : 1.0;
  p.ignore_index = ignore_index;
  p.has_labels = labels.has_value();
  if (p.has_labels) {
    check_row_labels(*labels, p.rows, student_logits);
  }
  if (check_indices) check_index_values(teacher_indices, p.cols, check_duplicates);
  return p;
}

void check_sparse_kd_loss_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    const SparseKDLossParams& params) {
  check_row_backward_args(grad_loss, stats, student_logits, params.rows,
                          sparse_kd_loss_stats::kCols);
}

}  // namespace distillkit
