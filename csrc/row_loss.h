// Host-side pieces shared by the per-row ops (kd_loss, sparse_kd_loss,
// slam_loss) and the distances, on CPU and CUDA alike: the accumulation
// dtype, the checks of labels, temperature and the backward's per-row inputs,
// and the first failing row of a host-side value check.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace distillkit {

// fp64 when the input is fp64, fp32 otherwise: the dtype of the losses, the
// stats and the upstream gradients.
at::ScalarType acc_scalar_type(const at::Tensor& input);

// Index of the first row where ok (a 1-D bool tensor) is false, or -1. One
// device-to-host sync on CUDA: the host-side value checks use it instead of a
// device assert, so that a bad value is a catchable error naming the argument.
int64_t first_bad_row(const at::Tensor& ok);

// labels: (rows,) int64 on the device of student_logits.
void check_row_labels(const at::Tensor& labels, int64_t rows, const at::Tensor& student_logits);

// temperature: finite and > 0.
void check_temperature(double temperature);

// grad_loss (rows,) and stats (rows, stats_cols) in the accumulation type of
// student_logits and on its device: the backward inputs of a per-row loss.
void check_row_backward_args(
    const at::Tensor& grad_loss,
    const at::Tensor& stats,
    const at::Tensor& student_logits,
    int64_t rows,
    int64_t stats_cols);

}  // namespace distillkit
