// The dtype dispatch of the host code, CPU and CUDA: f is a lambda templated
// on the input types, [&]<typename S, typename U>() { ... } (or <typename T>
// for one input), called once with the types of the given tensors. A dtype
// outside the set is a ValueError naming the argument and its dtype; the ops'
// argument checks reject such inputs first, so it guards the dispatch, never
// a silent fallback to another type.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "checks.h"

namespace distillkit {

template <typename S, typename F>
void dispatch_teacher_type(const at::Tensor& student, const char* student_name,
                           const at::Tensor& teacher, const char* teacher_name, F&& f) {
  switch (teacher.scalar_type()) {
    case at::kFloat: return f.template operator()<S, float>();
    case at::kHalf: return f.template operator()<S, c10::Half>();
    case at::kBFloat16: return f.template operator()<S, c10::BFloat16>();
    default:
      DK_CHECK(false, teacher_name, " must be fp32, bf16 or fp16 when ", student_name, " is ",
               student.scalar_type(), " (got ", teacher.scalar_type(), ")");
  }
}

// The dtype pairs the ops' argument checks admit: both fp64, or any two of
// fp32/bf16/fp16 (10 instantiations, not 4 x 4). The names are the
// arguments' as the error messages give them.
template <typename F>
void dispatch_input_types(const at::Tensor& student, const char* student_name,
                          const at::Tensor& teacher, const char* teacher_name, F&& f) {
  switch (student.scalar_type()) {
    case at::kDouble:
      DK_CHECK(teacher.scalar_type() == at::kDouble, teacher_name, " must be fp64 when ",
               student_name, " is fp64 (got ", teacher.scalar_type(), ")");
      return f.template operator()<double, double>();
    case at::kFloat:
      return dispatch_teacher_type<float>(student, student_name, teacher, teacher_name, f);
    case at::kHalf:
      return dispatch_teacher_type<c10::Half>(student, student_name, teacher, teacher_name, f);
    case at::kBFloat16:
      return dispatch_teacher_type<c10::BFloat16>(student, student_name, teacher, teacher_name,
                                                  f);
    default:
      DK_CHECK(false, student_name, " must be fp32, fp64, bf16 or fp16 (got ",
               student.scalar_type(), ")");
  }
}

// fp32 or fp64, for the ops that compute in the input's own type.
template <typename F>
void dispatch_fp32_fp64(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f.template operator()<float>();
    case at::kDouble: return f.template operator()<double>();
    default: DK_CHECK(false, name, " must be fp32 or fp64 (got ", t.scalar_type(), ")");
  }
}

}  // namespace distillkit
