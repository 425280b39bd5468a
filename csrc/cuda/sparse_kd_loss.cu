// CUDA kernels for sparse_kd_loss (docs/math.md §4); the math is in
// sparse_kd_loss.h, the stats layout in stats_layout.h.
//
// Mapping as in kd_loss.cu: one row per thread group, a warp for C <=
// kWarpRowMaxCols and the whole block otherwise, so a row's reductions never
// leave the block (no atomics; every loss is written once, deterministic).
//
// Forward: one streaming pass over z keeps an online log-sum-exp of z/T per
// thread; alongside, the group's threads split the row's K kept entries
// (strided by lane) and keep an online log-sum-exp of the teacher's l_k with
// the cross term sum exp(l_k - m) (l_k - z[I_k]/T) riding along, one gather
// of z per entry. Both states and the kept count are merged in a single
// group all-reduce. The teacher never exists as an N x C tensor.
//
// Backward recomputes q from the saved lse (no N x C buffer kept from the
// forward): one pass writes dz_j = c * mass * q_j for every column, a group
// barrier, then the threads owning the kept entries overwrite dz[I_k] with
// c * (mass * q_{I_k} - p_k), recomputed from z so that every element is
// rounded once. Indices are unique within a row (checked in the forward), so
// no element has two writers after the barrier.
//
// Indices are checked where they are read, in both kernels (the backward's
// may have been edited since the forward, e.g. in place through numpy): one
// outside [0, C) and not -1 is recorded (device_errors.cuh) and never
// dereferenced; the forward also records a class repeated within a row
// (O(K^2 / threads) compares per row) unless check_duplicates is off. The
// host never reads an index.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "common.cuh"
#include "device_errors.cuh"
#include "launch.cuh"
#include "row_loss.h"
#include "sparse_kd_loss.h"
#include "stats_layout.h"

namespace distillkit {
namespace {

using device::acc_t;
using device::first_row;
using device::for_each_pack;
using device::group_allreduce;
using device::kWarpSize;
using device::load_pack;
using device::OnlineLSE;
using device::row_stride;
using device::store_pack;
using device::xmul;
using launch::kBlockThreads;
using launch::kWarpRowMaxCols;
using launch::pack_aligned;

// Per-launch scalars, resolved on the host in double and rounded once.
template <typename A>
struct SparseScalars {
  int64_t rows;
  int cols;
  int64_t k;
  int64_t ignore_index;
  bool has_labels;
  bool renormalize;
  bool check_duplicates;  // forward only
  bool aligned;  // the student (and its gradient) base pointers are pack-aligned
  A inv_t;
  A soft_scale;       // T^2 or 1
  A soft_grad_scale;  // soft_scale / T
};

template <typename S, typename L, typename A>
struct ForwardArgs {
  const S* student;      // (N, C)
  const int64_t* index;  // (N, K)
  const L* logprobs;     // (N, K)
  const int64_t* labels; // nullptr without labels
  A* loss;               // (N,)
  A* stats;              // (N, sparse_kd_loss_stats::kCols)
  int64_t* errors;       // the input error record
  SparseScalars<A> k;
};

template <typename S, typename L, typename A>
struct BackwardArgs {
  const A* grad_loss;    // (N,)
  const S* student;
  const int64_t* index;
  const L* logprobs;
  const int64_t* labels; // nullptr without labels
  const A* stats;        // (N, sparse_kd_loss_stats::kCols), from the forward
  S* grad_student;
  int64_t* errors;       // the input error record
  SparseScalars<A> k;
};

// Entry e of a row's indices: its class, or -1 for padding and for an index
// outside [0, C), which is recorded and never dereferenced.
template <typename A>
__device__ __forceinline__ int64_t kept_class(const int64_t* index, int64_t e, int64_t row,
                                              const SparseScalars<A>& k, int64_t* errors) {
  const int64_t j = index[e];
  if (j >= k.cols || j < -1) {
    device::record_input_error(errors, InputError::kTeacherIndex, row, e, j, k.cols);
    return -1;
  }
  return j;
}

// Per-thread forward state: online lse of z/T; online lse of the kept l_k
// with t.a = sum exp(l_k - t.m) (l_k - z[I_k]/T); the number of kept entries
// (a float: it is merged with the same shuffles, and exact below 2^24).
template <typename A>
struct RowState {
  OnlineLSE<A> z;
  OnlineLSE<A> t;
  A kept;
};

template <typename A>
__device__ __forceinline__ RowState<A> merge(const RowState<A>& x, const RowState<A>& y) {
  return {device::merge(x.z, y.z), device::merge(x.t, y.t), x.kept + y.kept};
}

template <typename A>
__device__ __forceinline__ RowState<A> shfl_xor(const RowState<A>& v, int mask) {
  return {device::shfl_xor(v.z, mask), device::shfl_xor(v.t, mask),
          device::shfl_xor(v.kept, mask)};
}

// Makes the group's global writes so far visible to the whole group.
template <int kRowThreads>
__device__ __forceinline__ void group_sync() {
  if constexpr (kRowThreads == kWarpSize) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The row's loss and stats from the merged state (one thread per row).
template <typename A>
__device__ __forceinline__ void write_row(const RowState<A>& st, const SparseScalars<A>& k,
                                          A* loss, A* stats) {
  if (st.kept == A(0)) {  // all padding: a dead row
    *loss = A(0);
#pragma unroll
    for (int c = 0; c < sparse_kd_loss_stats::kCols; ++c) stats[c] = A(0);
    return;
  }
  const A lse_z = st.z.lse();
  const A lse_t = st.t.lse();
  A soft, mass;
  if (k.renormalize) {
    // a/s - lse_t + lse_z, the lse difference as (max difference) +
    // (log-sum difference) so that large lse values are not rounded before
    // they cancel. All kept l = -inf gives NaN, as the reference's softmax
    // over them does.
    soft = st.t.a / st.t.s + (st.z.m - st.t.m) +
           (device::acc_log(st.z.s) - device::acc_log(st.t.s));
    mass = st.t.s / st.t.s;
  } else {
    // p_k = exp(l_k): sum p (l - z/T + lse_z) = mass (a/s + lse_z).
    mass = device::acc_exp(lse_t);
    soft = xmul(mass, st.t.a / st.t.s + lse_z);
  }
  *loss = k.soft_scale * soft;
  stats[sparse_kd_loss_stats::kLseStudent] = lse_z;
  stats[sparse_kd_loss_stats::kTeacherLogNormalizer] = k.renormalize ? lse_t : A(0);
  stats[sparse_kd_loss_stats::kTeacherMass] = mass;
}

template <typename S, typename L, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    sparse_kd_loss_forward_kernel(const ForwardArgs<S, L, A> args) {
  constexpr int kVec = 16 / sizeof(S);
  __shared__ RowState<A> state_smem[kBlockThreads / kWarpSize];
  const SparseScalars<A>& k = args.k;
  const int lane = threadIdx.x % kRowThreads;

  for (int64_t row = first_row<kBlockThreads, kRowThreads>(); row < k.rows;
       row += row_stride<kBlockThreads, kRowThreads>()) {
    A* stats = args.stats + row * sparse_kd_loss_stats::kCols;
    if (k.has_labels && args.labels[row] == k.ignore_index) {
      if (lane == 0) {
        args.loss[row] = A(0);
#pragma unroll
        for (int c = 0; c < sparse_kd_loss_stats::kCols; ++c) stats[c] = A(0);
      }
      continue;
    }
    const int64_t row_start = row * k.cols;
    const S* z = args.student + row_start;
    const int64_t* index = args.index + row * k.k;
    const L* logprobs = args.logprobs + row * k.k;

    RowState<A> st{OnlineLSE<A>::empty(), OnlineLSE<A>::empty(), A(0)};
    for (int64_t e = lane; e < k.k; e += kRowThreads) {
      const int64_t j = kept_class(index, e, row, k, args.errors);
      if (j < 0) continue;  // padding
      if (k.check_duplicates) {
        for (int64_t f = 0; f < e; ++f) {
          if (index[f] == j) {
            device::record_input_error(args.errors, InputError::kDuplicateIndex, row, e, j, k.cols);
            break;
          }
        }
      }
      st.kept += A(1);
      const A l[1] = {static_cast<A>(logprobs[e])};
      const A d[1] = {l[0] - static_cast<A>(z[j]) * k.inv_t};
      st.t.add_weighted(l, d);
    }
    for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A zs[N];
      load_pack<N>(z + col, zs);
#pragma unroll
      for (int i = 0; i < N; ++i) zs[i] *= k.inv_t;
      st.z.add(zs);
    });
    st = group_allreduce<kRowThreads>(st, state_smem);

    if (lane == 0) write_row(st, k, args.loss + row, stats);
  }
}

template <typename S, typename L, typename A, int kRowThreads>
__global__ void __launch_bounds__(kBlockThreads)
    sparse_kd_loss_backward_kernel(const BackwardArgs<S, L, A> args) {
  constexpr int kVec = 16 / sizeof(S);
  const SparseScalars<A>& k = args.k;
  const int lane = threadIdx.x % kRowThreads;

  for (int64_t row = first_row<kBlockThreads, kRowThreads>(); row < k.rows;
       row += row_stride<kBlockThreads, kRowThreads>()) {
    const int64_t row_start = row * k.cols;
    const S* z = args.student + row_start;
    S* dz = args.grad_student + row_start;
    const A* stats = args.stats + row * sparse_kd_loss_stats::kCols;
    const A mass = stats[sparse_kd_loss_stats::kTeacherMass];

    if ((k.has_labels && args.labels[row] == k.ignore_index) || mass == A(0)) {
      for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
        constexpr int N = decltype(n)::value;
        const A zero[N] = {};
        store_pack<N>(dz + col, zero);
      });
      continue;
    }

    const A lse_z = stats[sparse_kd_loss_stats::kLseStudent];
    const A log_norm = stats[sparse_kd_loss_stats::kTeacherLogNormalizer];
    const A c = args.grad_loss[row] * k.soft_grad_scale;
    const A cm = c * mass;
    for_each_pack<kVec>(row_start, k.cols, k.aligned, lane, kRowThreads, [&](int col, auto n) {
      constexpr int N = decltype(n)::value;
      A g[N];
      load_pack<N>(z + col, g);
#pragma unroll
      for (int i = 0; i < N; ++i) g[i] = cm * device::acc_exp(g[i] * k.inv_t - lse_z);
      store_pack<N>(dz + col, g);
    });
    // The dense writes above must land before the kept classes are rewritten.
    group_sync<kRowThreads>();
    const int64_t* index = args.index + row * k.k;
    const L* logprobs = args.logprobs + row * k.k;
    for (int64_t e = lane; e < k.k; e += kRowThreads) {
      const int64_t j = kept_class(index, e, row, k, args.errors);
      if (j < 0) continue;
      const A p = device::acc_exp(static_cast<A>(logprobs[e]) - log_norm);
      const A q = device::acc_exp(static_cast<A>(z[j]) * k.inv_t - lse_z);
      dz[j] = static_cast<S>(c * (mass * q - p));
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename A>
SparseScalars<A> make_scalars(const SparseKDLossParams& p, bool aligned) {
  SparseScalars<A> k;
  k.rows = p.rows;
  k.cols = static_cast<int>(p.cols);
  k.k = p.k;
  k.ignore_index = p.ignore_index;
  k.has_labels = p.has_labels;
  k.renormalize = p.renormalize;
  k.check_duplicates = false;
  k.aligned = aligned;
  k.inv_t = static_cast<A>(1.0 / p.temperature);
  k.soft_scale = static_cast<A>(p.soft_scale);
  k.soft_grad_scale = static_cast<A>(p.soft_scale / p.temperature);
  return k;
}

template <typename S, typename L>
void launch_forward(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& lp,
                    const at::Tensor& labels, at::Tensor& loss, at::Tensor& stats,
                    bool check_duplicates, int64_t* errors, const SparseKDLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = 16 / sizeof(S);
  ForwardArgs<S, L, A> args;
  args.student = z.data_ptr<S>();
  args.index = idx.data_ptr<int64_t>();
  args.logprobs = lp.data_ptr<L>();
  args.labels = p.has_labels ? labels.data_ptr<int64_t>() : nullptr;
  args.loss = loss.data_ptr<A>();
  args.stats = stats.data_ptr<A>();
  args.errors = errors;
  args.k = make_scalars<A>(p, pack_aligned<kVec>(args.student));
  args.k.check_duplicates = check_duplicates;
  launch::launch_row_groups(
      p.cols <= kWarpRowMaxCols, p.rows, sparse_kd_loss_forward_kernel<S, L, A, kWarpSize>,
      sparse_kd_loss_forward_kernel<S, L, A, kBlockThreads>, args,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename L>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& idx,
                     const at::Tensor& lp, const at::Tensor& labels, const at::Tensor& stats,
                     at::Tensor& grad_z, int64_t* errors, const SparseKDLossParams& p) {
  using A = acc_t<S>;
  constexpr int kVec = 16 / sizeof(S);
  BackwardArgs<S, L, A> args;
  args.grad_loss = grad_loss.data_ptr<A>();
  args.student = z.data_ptr<S>();
  args.index = idx.data_ptr<int64_t>();
  args.logprobs = lp.data_ptr<L>();
  args.labels = p.has_labels ? labels.data_ptr<int64_t>() : nullptr;
  args.stats = stats.data_ptr<A>();
  args.grad_student = grad_z.data_ptr<S>();
  args.errors = errors;
  args.k = make_scalars<A>(p, pack_aligned<kVec>(args.student) && pack_aligned<kVec>(args.grad_student));
  launch::launch_row_groups(
      p.cols <= kWarpRowMaxCols, p.rows, sparse_kd_loss_backward_kernel<S, L, A, kWarpSize>,
      sparse_kd_loss_backward_kernel<S, L, A, kBlockThreads>, args,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_forward_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2,
    bool check_duplicates) {
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const auto acc_options = student_logits.options().dtype(acc_scalar_type(student_logits));
  at::Tensor loss = at::empty({p.rows}, acc_options);
  at::Tensor stats = at::empty({p.rows, sparse_kd_loss_stats::kCols}, acc_options);
  if (p.rows == 0) return {loss, stats};

  const at::Tensor z = student_logits.contiguous();
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const at::Tensor y = p.has_labels ? labels->contiguous() : at::Tensor();
  dispatch_input_types(z, "student_logits", lp, "teacher_logprobs",
                       [&]<typename S, typename L>() {
    launch_forward<S, L>(z, idx, lp, y, loss, stats, check_duplicates, errors, p);
  });
  return {loss, stats};
}

at::Tensor sparse_kd_loss_backward_cuda(
    const at::Tensor& grad_loss,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_indices,
    const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& labels,
    const at::Tensor& stats,
    double temperature,
    bool renormalize,
    int64_t ignore_index,
    bool scale_by_t2) {
  const SparseKDLossParams p = check_sparse_kd_loss_args(
      student_logits, teacher_indices, teacher_logprobs, labels, temperature, renormalize,
      ignore_index, scale_by_t2);
  check_sparse_kd_loss_backward_args(grad_loss, stats, student_logits, p);
  launch::check_cols_fit(p.cols, "student_logits", "classes");
  int64_t* const errors = device_error_record(student_logits);
  const c10::cuda::CUDAGuard guard(student_logits.device());
  at::Tensor grad_z = at::empty({p.rows, p.cols}, student_logits.options());
  if (p.rows == 0) return grad_z;

  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor z = student_logits.contiguous();
  const at::Tensor idx = teacher_indices.contiguous();
  const at::Tensor lp = teacher_logprobs.contiguous();
  const at::Tensor y = p.has_labels ? labels->contiguous() : at::Tensor();
  const at::Tensor s = stats.contiguous();
  dispatch_input_types(z, "student_logits", lp, "teacher_logprobs",
                       [&]<typename S, typename L>() {
    launch_backward<S, L>(g, z, idx, lp, y, s, grad_z, errors, p);
  });
  return grad_z;
}

}  // namespace
}  // namespace distillkit

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) {
  m.impl("sparse_kd_loss_forward", &distillkit::sparse_kd_loss_forward_cuda);
  m.impl("sparse_kd_loss_backward", &distillkit::sparse_kd_loss_backward_cuda);
}
