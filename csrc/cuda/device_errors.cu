// The extension's error record (device_errors.cuh) and the ops on it:
// check_errors, and check_labels, whose kernel records a bad label there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "device_errors.cuh"
#include "launch.cuh"
#include "row_loss.h"

namespace distillkit {
namespace {

std::mutex g_record_mutex;
// Never freed: it lives as long as the process (a static tensor would be
// released after the CUDA runtime has shut down).
at::Tensor* g_record = nullptr;

// Raises and clears what the kernels recorded; the caller holds the mutex.
void raise_recorded_locked() {
  if (g_record == nullptr) return;
  int64_t* r = g_record->data_ptr<int64_t>();
  volatile int64_t* code = r + record_slot::kCode;
  if (*code == 0) return;
  int64_t copy[record_slot::kRecordSlots];
  for (int i = 0; i < record_slot::kRecordSlots; ++i) copy[i] = static_cast<volatile int64_t*>(r)[i];
  // Code first, claim last: a kernel that claims after this sees a clear record.
  *code = 0;
  static_cast<volatile int64_t*>(r)[record_slot::kClaim] = 0;
  throw_input_error(copy);
}

// check_errors(Tensor like): waits for the device, then raises what its
// kernels recorded.
void check_errors_cuda(const at::Tensor& like) {
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  const std::lock_guard<std::mutex> lock(g_record_mutex);
  raise_recorded_locked();
}

// Grid-stride over the labels; a bad one is recorded with the bound and
// ignore_index of the message (the record keeps the first writer's).
__global__ void __launch_bounds__(launch::kBlockThreads)
    check_labels_kernel(const int64_t* labels, int64_t n, int64_t num_classes,
                        int64_t ignore_index, int64_t* errors) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t y = labels[i];
    if (y != ignore_index && (y < 0 || y >= num_classes)) {
      device::record_input_error(errors, InputError::kLabel, i, -1, y, num_classes, ignore_index);
    }
  }
}

// check_labels(labels, num_classes, ignore_index): one launch, no host read of
// the labels; a bad one raises at the next distillkit CUDA call or check_errors.
void check_labels_cuda(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  check_label_bound_args(labels, num_classes);
  int64_t* const errors = device_error_record(labels);
  const c10::cuda::CUDAGuard guard(labels.device());
  const int64_t n = labels.numel();
  if (n == 0) return;
  const at::Tensor y = labels.contiguous();
  check_labels_kernel<<<launch::grid_for(n, launch::kBlockThreads), launch::kBlockThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(y.data_ptr<int64_t>(), n,
                                                             num_classes, ignore_index, errors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t* device_error_record(const at::Tensor& like) {
  const std::lock_guard<std::mutex> lock(g_record_mutex);
  raise_recorded_locked();
  if (g_record == nullptr) {
    // Pinned when the op's tensors are on a GPU, for the kernels to write; the
    // emulator (../shared/cudaemu) runs this host code on CPU tensors.
    g_record = new at::Tensor(at::empty(
        {record_slot::kRecordSlots},
        at::TensorOptions().dtype(at::kLong).pinned_memory(like.is_cuda())));
    std::memset(g_record->data_ptr<int64_t>(), 0, sizeof(int64_t) * record_slot::kRecordSlots);
  }
  return g_record->data_ptr<int64_t>();
}

}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("check_errors", &distillkit::check_errors_cuda);
  m.impl("check_labels", &distillkit::check_labels_cuda);
}
