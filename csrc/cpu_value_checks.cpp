#include "cpu_value_checks.h"

#include <ATen/ops/abs.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "row_loss.h"
#include "slam_loss.h"

namespace distillkit {

// Index of the first row where ok (a 1-D bool tensor) is false, or -1.
static int64_t first_bad_row(const at::Tensor& ok) {
  if (ok.all().item<bool>()) return -1;
  return (~ok).nonzero().select(1, 0)[0].item<int64_t>();
}

void check_label_values(const at::Tensor& y, int64_t cols, int64_t ignore_index) {
  if (y.numel() == 0) return;
  const at::Tensor ok =
      at::logical_or(at::logical_and(y.ge(0), y.lt(cols)), y.eq(ignore_index));
  const int64_t bad = first_bad_row(ok);
  DK_CHECK(bad < 0, "labels must be in [0, ", cols, ") or equal ignore_index=", ignore_index,
           " (labels[", bad, "] = ", bad < 0 ? 0 : y[bad].item<int64_t>(), ")");
}

void check_slam_values(const at::Tensor& teacher_probs, const at::Tensor& alpha,
                       const at::Tensor& k, bool normalized) {
  const int64_t rows = teacher_probs.size(0), cols = teacher_probs.size(1);
  if (rows == 0) return;
  int64_t bad = first_bad_row(at::logical_and(alpha.gt(0), alpha.le(1)));
  DK_CHECK(bad < 0, "alpha must be in (0, 1] (alpha[", bad, "] = ",
           bad < 0 ? 0.0 : alpha[bad].item<double>(), ")");
  const int64_t k_min = normalized ? 2 : 1;
  bad = first_bad_row(at::logical_and(k.ge(k_min), k.le(cols)));
  DK_CHECK(bad < 0, "k must be in [", k_min, ", ", cols, "]",
           normalized ? " (normalized=True needs k >= 2)" : "", " (k[", bad, "] = ",
           bad < 0 ? 0 : k[bad].item<int64_t>(), ")");
  const double tol = teacher_sum_tolerance(teacher_probs.scalar_type());
  // Row blocks bound any temporaries of the reductions to a few MiB; sums
  // accumulate in fp32 (fp64 for fp64), far below the tolerance.
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 23) / std::max<int64_t>(cols, 1));
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const at::Tensor t = teacher_probs.narrow(0, r0, std::min(block, rows - r0));
    bad = first_bad_row(t.amin(1).ge(0));  // NaN fails too
    DK_CHECK(bad < 0, "teacher_probs must be non-negative (row ", r0 + bad,
             " has a negative or NaN entry)");
    const at::Tensor sums = t.sum(1, /*keepdim=*/false, acc_scalar_type(teacher_probs));
    bad = first_bad_row(at::abs(sums.sub(1.0)).le(tol));
    DK_CHECK(bad < 0, "teacher_probs rows must sum to 1 within ", tol, " (row ", r0 + bad,
             " sums to ", bad < 0 ? 0.0 : sums[bad].item<double>(), ")");
  }
}

void check_index_values(const at::Tensor& idx, int64_t cols, bool check_duplicates) {
  if (idx.numel() == 0) return;
  const at::Tensor ok = at::logical_or(at::logical_and(idx.ge(0), idx.lt(cols)), idx.eq(-1));
  if (!ok.all().item<bool>()) {
    const at::Tensor bad = (~ok).nonzero()[0];
    const int64_t r = bad[0].item<int64_t>(), k = bad[1].item<int64_t>();
    DK_CHECK(false, "teacher_indices must be in [0, ", cols, ") or -1 for padding "
             "(teacher_indices[", r, ", ", k, "] = ", idx[r][k].item<int64_t>(), ")");
  }
  if (!check_duplicates || idx.size(1) < 2) return;
  // O(N K log K): sort each row, then compare neighbours; padding may repeat.
  const at::Tensor sorted = std::get<0>(idx.sort(1));
  const int64_t kk = idx.size(1);
  const at::Tensor next = sorted.narrow(1, 1, kk - 1);
  const at::Tensor dup = at::logical_and(next.eq(sorted.narrow(1, 0, kk - 1)), next.ge(0));
  if (dup.any().item<bool>()) {
    const at::Tensor bad = dup.nonzero()[0];
    const int64_t r = bad[0].item<int64_t>();
    DK_CHECK(false, "teacher_indices must not repeat a class within a row (row ", r,
             " holds class ", next[r][bad[1].item<int64_t>()].item<int64_t>(),
             " twice; pass check_duplicates=False only for indices known to be unique)");
  }
}

}  // namespace distillkit
