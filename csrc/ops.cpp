// The table of contents: every distillkit op schema, declared once. Kernels
// register per dispatch key at the foot of csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu; autograd and fake kernels live in distillkit/ops.py. The
// stats layouts are named in stats_layout.h; the Python module distillkit._C
// is python/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(distillkit, m) {
  // Raises the ValueError of a bad input value that a CUDA kernel found and
  // recorded (csrc/input_errors.h, cuda/device_errors.cuh), after waiting for
  // the device of `like`; a no-op on the CPU, whose ops raise at the call.
  m.def("check_errors(Tensor like) -> ()");
  // Checks that every label (labels (N,) int64) is in [0, num_classes) or
  // equals ignore_index, with the ValueError of a kd_loss label: the CPU raises
  // at the call, a CUDA kernel records the first bad entry it meets (raised as
  // above). For callers whose kernels see only part of the classes
  // (vocab-parallel KD, where the bound is the global vocabulary).
  m.def("check_labels(Tensor labels, int num_classes, int ignore_index) -> ()");

  // Soft-label KD loss over rows of (N, C) logits (docs/math.md §1). Returns the
  // per-row loss (fp32, fp64 for fp64 input; ignored rows are 0) and per-row
  // statistics (N, kd_loss_stats::kCols) that the backward reuses instead of
  // an N x C buffer (stats_layout.h; the math in kd_loss.h).
  m.def(
      "kd_loss_forward(Tensor student_logits, Tensor teacher_logits, "
      "Tensor? labels, float temperature, str divergence, float beta, "
      "float hard_weight, int ignore_index, bool scale_by_t2) "
      "-> (Tensor loss, Tensor stats)");
  // Gradients of sum_i grad_loss[i] * loss[i]. grad_teacher is an empty (0,)
  // tensor unless teacher_grad is set, so a frozen teacher costs no writes.
  m.def(
      "kd_loss_backward(Tensor grad_loss, Tensor student_logits, "
      "Tensor teacher_logits, Tensor? labels, Tensor stats, float temperature, "
      "str divergence, float beta, float hard_weight, int ignore_index, "
      "bool scale_by_t2, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  // kd_loss_forward and, in the same pass over each row, the gradients of
  // sum_i grad_scale[i] * loss[i] (grad_scale (N,) or 0-d; all ones when
  // None): the logits are read once, and a caller that knows the scale at
  // forward time gets the final gradient. grad_teacher is an empty (0,)
  // tensor unless teacher_grad is set.
  m.def(
      "kd_loss_forward_grad(Tensor student_logits, Tensor teacher_logits, "
      "Tensor? labels, Tensor? grad_scale, float temperature, str divergence, "
      "float beta, float hard_weight, int ignore_index, bool scale_by_t2, "
      "bool teacher_grad) "
      "-> (Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");
  // grad_rows[i] * unit_grad[i, :] as a new tensor of unit_grad's dtype
  // (products in fp32, fp64 for fp64; grad_rows (N,) or 0-d): the backward of
  // kd_loss_forward_grad, into resident memory on the CPU.
  m.def("kd_loss_scale_grad(Tensor unit_grad, Tensor grad_rows) -> Tensor");
  // The same product in place, in grad itself: the backward of a saved
  // gradient read for the last time. Rows whose factor is exactly 1 (the
  // usual upstream gradient of a reduced loss whose scale the forward
  // applied) are left as they are: x * 1 is x, and the CPU kernel skips them.
  m.def("kd_loss_scale_grad_(Tensor(a!) grad, Tensor grad_rows) -> ()");

  // SLaM student-label-mixing loss (docs/math.md §5) over rows of (N, C) student
  // logits and teacher probabilities; alpha (N,) in (0, 1], k (N,) int64 in
  // [1, C]. Returns the per-row loss and per-row stats (N,
  // slam_loss_stats::kCols) for backward (stats_layout.h; the math in
  // slam_loss.h).
  m.def(
      "slam_loss_forward(Tensor student_logits, Tensor teacher_probs, "
      "Tensor alpha, Tensor k, bool normalized, bool hard) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "slam_loss_backward(Tensor grad_loss, Tensor student_logits, "
      "Tensor teacher_probs, Tensor alpha, Tensor k, Tensor stats, "
      "bool normalized, bool hard) -> Tensor");

  // Elementwise distances for searched distillers (docs/math.md §7): op is "l1",
  // "l2" (squared error) or "smooth_l1" (beta = 1). Forward returns the sum
  // over all elements as a 0-d tensor (fixed-order partials: deterministic);
  // backward returns grad * d/dstudent and, if teacher_grad, its negation
  // for the teacher (else an empty (0,) tensor).
  m.def("pointwise_distance_forward(Tensor student, Tensor teacher, str op) -> Tensor");
  m.def(
      "pointwise_distance_backward(Tensor grad, Tensor student, Tensor teacher, str op, "
      "bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
  // Row distances 1 - <u, v> / (|u| |v| + eps), eps = 1e-8, over the middle
  // dimension of (outer, D, inner) inputs: cosine (u = s, v = t) or, with
  // center, Pearson (u, v centred). A row with |u| = 0 or |v| = 0 has
  // distance 1 and zero gradient. Returns rows (outer, inner) and stats
  // (outer, inner, correlation_distance_stats::kCols) for the backward
  // (stats_layout.h).
  m.def(
      "correlation_distance_forward(Tensor student, Tensor teacher, bool center) "
      "-> (Tensor rows, Tensor stats)");
  m.def(
      "correlation_distance_backward(Tensor grad_rows, Tensor student, Tensor teacher, "
      "Tensor stats, bool center, bool teacher_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");

  // KD loss against a sparse (top-K) teacher (docs/math.md §4): rows of (N, C)
  // student logits, (N, K) int64 teacher indices (-1 = padding) and their
  // teacher log-probabilities. Returns the per-row loss (fp32, fp64 for fp64
  // input; dead rows are 0) and stats (N, sparse_kd_loss_stats::kCols) for
  // the backward (stats_layout.h; the math in sparse_kd_loss.h).
  // Indices out of [0, C) (other than -1) are an error; so are classes
  // repeated within a row, unless check_duplicates is false. With
  // teacher_tail_logprob (N,), the log of the teacher's mass outside its K
  // kept classes, the row compares K + 1 buckets (the student's tail is its
  // mass outside the kept classes) under divergence / beta ("forward_kl",
  // "reverse_kl", "jsd"); without it only forward KL is defined. The three
  // trailing arguments have defaults, so the original positional calls hold.
  m.def(
      "sparse_kd_loss_forward(Tensor student_logits, Tensor teacher_indices, "
      "Tensor teacher_logprobs, Tensor? labels, float temperature, bool renormalize, "
      "int ignore_index, bool scale_by_t2, bool check_duplicates, "
      "Tensor? teacher_tail_logprob=None, str divergence=\"forward_kl\", float beta=0.5) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "sparse_kd_loss_backward(Tensor grad_loss, Tensor student_logits, "
      "Tensor teacher_indices, Tensor teacher_logprobs, Tensor? labels, Tensor stats, "
      "float temperature, bool renormalize, int ignore_index, bool scale_by_t2, "
      "Tensor? teacher_tail_logprob=None, str divergence=\"forward_kl\", float beta=0.5) "
      "-> Tensor");

  // One step of the coordinate-wise LSTM optimizer (docs/math.md §8) on P independent
  // coordinates sharing the weights: preprocess grad (P,), run L stacked LSTM
  // cells (w_ih[l] (4H_l, in_l), w_hh[l] (4H_l, H_l), bias[l] (4H_l,) = b_ih +
  // b_hh, gate order i, f, g, o; in_0 = 2), take out = head_weight . h_L +
  // head_bias (or h_L when there is no head; then H_L = 1) and return
  // params + output_scale * out. States are packed (P, sum_l H_l), layer l at
  // column offset sum_{k<l} H_k.
  m.def(
      "coordinate_lstm_forward(Tensor grad, Tensor params, Tensor h, Tensor c, "
      "Tensor[] w_ih, Tensor[] w_hh, Tensor[] bias, Tensor? head_weight, "
      "Tensor? head_bias, float preprocess_p, float output_scale) "
      "-> (Tensor params_out, Tensor h_out, Tensor c_out)");
  // Backward of one step from the saved inputs (grad, h, c): gates are
  // recomputed, not saved. Undefined grad_h_out / grad_c_out count as zeros.
  // The gradient for params is grad_params_out itself (not returned). Weight
  // gradients are sums over coordinates in a fixed order (deterministic);
  // grad_head_* are empty (0,) tensors without a head.
  m.def(
      "coordinate_lstm_backward(Tensor grad_params_out, Tensor? grad_h_out, "
      "Tensor? grad_c_out, Tensor grad, Tensor h, Tensor c, Tensor[] w_ih, "
      "Tensor[] w_hh, Tensor[] bias, Tensor? head_weight, Tensor? head_bias, "
      "float preprocess_p, float output_scale) "
      "-> (Tensor grad_grad, Tensor grad_h, Tensor grad_c, Tensor[] grad_w_ih, "
      "Tensor[] grad_w_hh, Tensor[] grad_bias, Tensor grad_head_weight, "
      "Tensor grad_head_bias)");

  // out = a b, or out += a b when accumulate: (M, K) a and (K, N) b of one
  // dtype, out (M, N) of that dtype or fp32 for bf16 / fp16 operands, whose
  // products then accumulate in fp32 into out, never rounded to bf16 (fused
  // linear KD's weight gradient, summed over row chunks; docs/math.md §2).
  // out must not overlap a or b.
  m.def("matmul_into(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()");
  // An uninitialized contiguous tensor of that size and dtype on like's
  // device; on the CPU from the output cache (cpu/output_cache.h): resident
  // blocks reused step after step, for the per-call buffers of a loop.
  m.def("empty_cached(Tensor like, int[] size, ScalarType dtype) -> Tensor");
}
