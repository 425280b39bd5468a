// The per-row statistics that the forwards return and the backwards read back
// instead of an N x C buffer: one named column per value, and the only
// definition of each layout. The CPU and CUDA kernels index stats by these
// names; the Python module exports the same tables (python/module.cpp) as
// distillkit._C.<op>_stats_layout (name -> column) and <op>_stats_cols.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__
#else
#define DK_HOST_DEVICE
#endif

namespace distillkit {

// A column as Python sees it: its name and its index.
struct StatsColumn {
  const char* name;
  int index;
};

// kd_loss_forward: stats (N, kCols). With zs = z/T and us = u/T (D_student
// and D_teacher as defined in kd_loss.h); ignored rows are all zeros.
namespace kd_loss_stats {
enum Column : int {
  kLseStudent,      // lse(zs)
  kLseTeacher,      // lse(us)
  kLseStudentT1,    // lse(z), the hard term's; repeats lse(zs) unless the hard term is on and T != 1
  kDStudent,        // D_student
  kDTeacher,        // D_teacher
  // lse(us) - lse(zs) to full precision, c + log1p(X) of kd_loss.h, on the rows
  // that took the cancellation-free pass (the backward's such pass reads it:
  // rp = log p - log q = (us - zs) - offset); elsewhere the rounded difference
  // of the two lse columns, which the backward does not read.
  kLogRatioOffset,
  kCols
};
inline constexpr StatsColumn kColumns[] = {
    {"lse_student", kLseStudent}, {"lse_teacher", kLseTeacher},
    {"lse_student_t1", kLseStudentT1}, {"d_student", kDStudent}, {"d_teacher", kDTeacher},
    {"log_ratio_offset", kLogRatioOffset}};
}  // namespace kd_loss_stats

// A column that holds an integer (a class index, a count) holds the bits of
// an integer of its width (int32 in fp32 stats, int64 in fp64 stats), not a
// value: a float holds integers exactly only up to 2^24, the bits up to the
// 2^31 - 1 classes the ops accept. The column's value as a float means
// nothing; read it with stat_int.
template <typename A>
using stat_int_t = std::conditional_t<sizeof(A) == 8, int64_t, int32_t>;

template <typename A>
DK_HOST_DEVICE inline A int_stat(int64_t i) {
  const stat_int_t<A> v = static_cast<stat_int_t<A>>(i);
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 8) {
    return __longlong_as_double(v);
  } else {
    return __int_as_float(v);
  }
#else
  A out;
  std::memcpy(&out, &v, sizeof out);
  return out;
#endif
}

template <typename A>
DK_HOST_DEVICE inline int64_t stat_int(A stat) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 8) {
    return __double_as_longlong(stat);
  } else {
    return __float_as_int(stat);
  }
#else
  stat_int_t<A> v;
  std::memcpy(&v, &stat, sizeof v);
  return v;
#endif
}

// slam_loss_forward: stats (N, kCols), in the notation of slam_loss.h.
namespace slam_loss_stats {
enum Column : int {
  kMaxStudent,     // m = max z; lse(z) = m + ls, kept apart (log f = (z - m) - ls)
  kLogSumStudent,  // ls = log sum exp(z - m)
  kThreshold,      // thr, the k-th largest teacher probability
  kTies,           // entries equal to thr taken into the top-k set M (int_stat)
  kTeacherArgmax,  // yhat = argmax t, the first one (int_stat)
  kTeacherMass,    // sum_i t_i (soft) or 1 (hard)
  kHSum,           // S = sum_i h_i
  kCols
};
inline constexpr StatsColumn kColumns[] = {
    {"max_student", kMaxStudent},       {"log_sum_student", kLogSumStudent},
    {"threshold", kThreshold},          {"ties", kTies},
    {"teacher_argmax", kTeacherArgmax}, {"teacher_mass", kTeacherMass}, {"h_sum", kHSum}};
}  // namespace slam_loss_stats

// sparse_kd_loss_forward: stats (N, kCols), in the notation of
// sparse_kd_loss.h; dead rows are all zeros.
namespace sparse_kd_loss_stats {
enum Column : int {
  kLseStudent,           // lse(z/T)
  kTeacherLogNormalizer, // N: lse_t over the kept (+ tail) buckets (renormalize), or 0
  kTeacherMass,          // sum_b P_b over the kept (+ tail) buckets; 0 marks a dead row
  kDenseCoef,            // gamma: the tail classes' gradient is c (gamma q_j - ...)
  kTailLogRatio,         // rho = log P_tail - log Q_tail (forward KL with a tail), else -inf
  kDivergence,           // D (reverse KL) or D_s = KL(Q || M) (JSD), else 0
  kCols
};
inline constexpr StatsColumn kColumns[] = {{"lse_student", kLseStudent},
                                           {"teacher_log_normalizer", kTeacherLogNormalizer},
                                           {"teacher_mass", kTeacherMass},
                                           {"dense_coef", kDenseCoef},
                                           {"tail_log_ratio", kTailLogRatio},
                                           {"divergence", kDivergence}};
}  // namespace sparse_kd_loss_stats

// correlation_distance_forward: stats (outer, inner, kCols) of the row
// distance 1 - <u, v> / (|u| |v| + eps), u = s - mean s, v = t - mean t (the
// means are 0 without centring). A degenerate row (|u| = 0 or |v| = 0) has
// zero norms and cosine.
namespace correlation_distance_stats {
enum Column : int {
  kMeanStudent,  // mean s (0 without centring)
  kMeanTeacher,  // mean t (0 without centring)
  kNormStudent,  // |u|
  kNormTeacher,  // |v|
  kCosine,       // <u, v> / (|u| |v|), in [-1, 1] (where <u, v> itself may overflow)
  kCols
};
inline constexpr StatsColumn kColumns[] = {
    {"mean_student", kMeanStudent}, {"mean_teacher", kMeanTeacher},
    {"norm_student", kNormStudent}, {"norm_teacher", kNormTeacher}, {"cosine", kCosine}};
}  // namespace correlation_distance_stats

// Each table names every column once, in column order.
template <int kCols, int kNames>
constexpr bool names_every_column(const StatsColumn (&columns)[kNames]) {
  if (kNames != kCols) return false;
  for (int i = 0; i < kNames; ++i) {
    if (columns[i].index != i) return false;
  }
  return true;
}
static_assert(names_every_column<kd_loss_stats::kCols>(kd_loss_stats::kColumns));
static_assert(names_every_column<slam_loss_stats::kCols>(slam_loss_stats::kColumns));
static_assert(names_every_column<sparse_kd_loss_stats::kCols>(sparse_kd_loss_stats::kColumns));
static_assert(names_every_column<correlation_distance_stats::kCols>(
    correlation_distance_stats::kColumns));

}  // namespace distillkit
