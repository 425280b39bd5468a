// Host-side pieces shared by the CPU and CUDA distance kernels (docs/math.md §7).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace distillkit {

enum class PointwiseOp : int { L1 = 0, L2 = 1, SmoothL1 = 2 };

constexpr double kCorrelationEps = 1e-8;

// Same shape, floating, same device, fp64 paired with fp64; `dims` < 0 skips
// the rank check. Throws ValueError naming the argument.
void check_distance_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t dims);

PointwiseOp parse_pointwise_op(c10::string_view op);

// The pointwise kernels' view of their inputs (docs/math.md §7.1): the
// elements in logical (row-major) order j = r * len + c, read from element
// r * s_row + c of the student's data and r * t_row + c of the teacher's.
// An input that steps through its elements in rows of unit stride, whatever
// the stride between them (x[:, :D] of a wider buffer, logits[:, :-1, :]: B
// rows of (S - 1) V), is read in place; any other one is made contiguous, and
// so is the teacher when both are such rows but of different lengths. Two
// contiguous inputs are one row of numel (flat()); the element order, hence
// every sum, does not depend on the layout.
struct PointwiseRows {
  at::Tensor student;
  at::Tensor teacher;
  int64_t len;    // elements per row, >= 1
  int64_t s_row;  // row strides, in elements
  int64_t t_row;

  bool flat() const { return s_row == len && t_row == len; }
};

PointwiseRows pointwise_rows(const at::Tensor& student, const at::Tensor& teacher);

void check_correlation_distance_backward_args(const at::Tensor& grad_rows,
                                              const at::Tensor& stats,
                                              const at::Tensor& student);

}  // namespace distillkit
