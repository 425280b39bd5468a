// The CUDA side of input_errors.h: the extension's one error record, in host
// memory that the kernels write directly (pinned, and so mapped into every
// device's address space under unified addressing), so that the host reads it
// with a plain load: no copy, no sync.
//
// Every CUDA op's host function takes the record's pointer through
// device_error_record(), which first raises whatever an earlier kernel left
// there: a bad value raises in the first distillkit CUDA call after the kernel
// that found it has finished, and at the latest in the check_errors op, which
// waits for the device first (the one documented sync).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "input_errors.h"

namespace distillkit {

// Raises the recorded error, if any, and clears the record; then returns the
// record for the next kernels. `like`: a tensor of the op.
int64_t* device_error_record(const at::Tensor& like);

namespace device {

// Records one bad entry; the first writer of the process wins, the others
// return (the record holds one error until the host raises it).
__device__ __forceinline__ void record_input_error(int64_t* record, InputError code, int64_t row,
                                                   int64_t col, int64_t value, int64_t bound,
                                                   int64_t aux = 0) {
  using namespace record_slot;
  auto* claim = reinterpret_cast<unsigned long long*>(record + kClaim);
  if (atomicCAS(claim, 0ull, 1ull) != 0ull) return;
  record[kRow] = row;
  record[kCol] = col;
  record[kValue] = value;
  record[kBound] = bound;
  record[kAux] = aux;
  // The fields reach the host before the code that says they are complete.
  __threadfence_system();
  *reinterpret_cast<volatile int64_t*>(record + kCode) = static_cast<int64_t>(code);
}

}  // namespace device
}  // namespace distillkit
