// The extension's error record (device_errors.cuh) and the check_errors op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "device_errors.cuh"

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
}
