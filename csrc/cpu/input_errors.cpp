// check_errors and check_labels on the CPU: nothing is ever pending, since
// the CPU ops raise a bad input value at the call (input_errors.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu_value_checks.h"
#include "row_loss.h"

namespace distillkit {
namespace {

void check_errors_cpu(const at::Tensor&) {}

void check_labels_cpu(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  check_label_bound_args(labels, num_classes);
  check_label_values(labels, num_classes, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("check_errors", &check_errors_cpu);
  m.impl("check_labels", &check_labels_cpu);
}

}  // namespace distillkit
