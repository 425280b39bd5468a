#include "sparse_kd_loss.h"

#include <string>

#include "checks.h"
#include "row_loss.h"
#include "stats_layout.h"

namespace distillkit {

// "jsd" at beta = 0 / 1 is forward / reverse KL, as for kd_loss (docs/math.md §1.1).
static Divergence parse_sparse_divergence(c10::string_view name, double beta) {
  DK_CHECK(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1] (got ", beta, ")");
  if (name == "forward_kl" || (name == "jsd" && beta == 0.0)) return Divergence::ForwardKL;
  if (name == "reverse_kl" || (name == "jsd" && beta == 1.0)) return Divergence::ReverseKL;
  DK_CHECK(name == "jsd", "divergence must be one of 'forward_kl', 'reverse_kl', 'jsd' (got '",
           std::string(name), "')");
  return Divergence::JSD;
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
    const std::optional<at::Tensor>& teacher_tail_logprob,
    c10::string_view divergence,
    double beta) {
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
  // C = 0 has no distribution to compare, whatever N (N = 0 rows are fine).
  DK_CHECK(student_logits.size(1) >= 1, "student_logits must have at least one class (got "
           "shape ", student_logits.sizes(), ")");
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
  p.has_tail = teacher_tail_logprob.has_value();
  p.divergence = parse_sparse_divergence(divergence, beta);
  p.beta = beta;
  DK_CHECK(p.has_tail || p.divergence == Divergence::ForwardKL,
           "divergence='", std::string(divergence), "' needs teacher_tail_logprob: it "
           "compares complete distributions, the K kept classes plus the tail bucket");
  if (p.has_tail) {
    const at::Tensor& tail = *teacher_tail_logprob;
    DK_CHECK_DIM(tail, "teacher_tail_logprob", 1);
    DK_CHECK(tail.size(0) == p.rows, "teacher_tail_logprob must have one entry per row of "
             "student_logits (got ", tail.size(0), " and ", p.rows, ")");
    DK_CHECK(tail.scalar_type() == teacher_logprobs.scalar_type(), "teacher_tail_logprob must "
             "have teacher_logprobs' dtype (got ", tail.scalar_type(), " and ",
             teacher_logprobs.scalar_type(), ")");
    DK_CHECK_SAME_DEVICE(tail, "teacher_tail_logprob", student_logits, "student_logits");
  }
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
