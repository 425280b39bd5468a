#include "distance.h"

#include <array>
#include <optional>

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

namespace {

struct RowGrid {
  int64_t len, s_row, t_row;
};

// The rows that both stride sets walk a tensor of `sizes` in, as
// PointwiseRows: dims of size 1 dropped (their stride is never stepped),
// neighbours merged where both step over the pair as over one dim; a grid
// when at most two dims are left and the inner one has unit stride in both.
std::optional<RowGrid> shared_rows(at::IntArrayRef sizes, at::IntArrayRef s_strides,
                                   at::IntArrayRef t_strides) {
  struct Dim {
    int64_t size, s, t;
  };
  std::array<Dim, 2> dims{};  // innermost first
  int n = 0;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (n > 0) {
      Dim& in = dims[n - 1];
      if (s_strides[d] == in.size * in.s && t_strides[d] == in.size * in.t) {
        in.size *= sizes[d];
        continue;
      }
    }
    if (n == 2) return std::nullopt;
    dims[n++] = {sizes[d], s_strides[d], t_strides[d]};
  }
  if (n == 0) return RowGrid{1, 1, 1};  // one element
  if (dims[0].s != 1 || dims[0].t != 1) return std::nullopt;
  if (n == 1) return RowGrid{dims[0].size, dims[0].size, dims[0].size};
  return RowGrid{dims[0].size, dims[1].s, dims[1].t};
}

}  // namespace

PointwiseRows pointwise_rows(const at::Tensor& student, const at::Tensor& teacher) {
  at::Tensor s = student, t = teacher;
  if (s.numel() == 0) return {s.contiguous(), t.contiguous(), 1, 1, 1};
  const at::IntArrayRef sizes = s.sizes();
  std::optional<RowGrid> grid = shared_rows(sizes, s.strides(), t.strides());
  if (!grid) {
    if (!shared_rows(sizes, s.strides(), s.strides())) s = s.contiguous();
    if (!shared_rows(sizes, t.strides(), t.strides())) t = t.contiguous();
    grid = shared_rows(sizes, s.strides(), t.strides());
  }
  if (!grid) {  // both are rows, of different lengths
    t = t.contiguous();
    grid = shared_rows(sizes, s.strides(), t.strides());
  }
  return {s, t, grid.value().len, grid.value().s_row, grid.value().t_row};
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
