// Host-side pieces shared by the per-row ops (kd_loss, sparse_kd_loss,
// slam_loss) and the distances, on CPU and CUDA alike: the accumulation
// dtype and the checks of labels, temperature and the backward's per-row
// inputs (shapes, dtypes and devices: nothing here reads tensor contents).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace distillkit {

// fp64 when the input is fp64, fp32 otherwise: the dtype of the losses, the
// stats and the upstream gradients.
at::ScalarType acc_scalar_type(const at::Tensor& input);

// labels: (rows,) int64 on the device of student_logits.
void check_row_labels(const at::Tensor& labels, int64_t rows, const at::Tensor& student_logits);

// check_labels' arguments: labels (N,) int64, num_classes >= 1.
void check_label_bound_args(const at::Tensor& labels, int64_t num_classes);

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
