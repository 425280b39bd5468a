// The CPU path's value checks: they read tensor contents on the host, so the
// bad entry raises at the call with the first offending row. Included only
// by csrc/cpu/: the CUDA host code never reads device memory (its kernels
// validate where they read, see input_errors.h), and tests/test_no_host_sync.py
// checks that nothing reached from csrc/cuda/ includes this file.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace distillkit {

// labels (rows,) int64: each in [0, cols) or equal to ignore_index.
void check_label_values(const at::Tensor& labels, int64_t cols, int64_t ignore_index);

// alpha in (0, 1], k in [k_min, cols] (k_min = 2 when normalized, else 1),
// teacher rows non-negative and summing to 1 within teacher_sum_tolerance.
void check_slam_values(const at::Tensor& teacher_probs, const at::Tensor& alpha,
                       const at::Tensor& k, bool normalized);

// teacher indices (N, K): in [0, cols) or -1, and, if check_duplicates, no
// class twice within a row.
void check_index_values(const at::Tensor& idx, int64_t cols, bool check_duplicates);

}  // namespace distillkit
