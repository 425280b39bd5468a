// check_errors on the CPU: nothing is ever pending, since the CPU ops raise
// a bad input value at the call (input_errors.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace distillkit {
namespace {

void check_errors_cpu(const at::Tensor&) {}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("check_errors", &check_errors_cpu); }

}  // namespace distillkit
