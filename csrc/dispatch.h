// The dispatch over the input dtype pairs the ops admit, shared by the CPU
// and CUDA host code: f is called once with a TypeTag of each input's type.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "checks.h"

namespace distillkit {

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename S, typename F>
void dispatch_teacher_type(at::ScalarType teacher, const char* teacher_name, F&& f) {
  switch (teacher) {
    case at::kFloat: return f(TypeTag<S>{}, TypeTag<float>{});
    case at::kHalf: return f(TypeTag<S>{}, TypeTag<c10::Half>{});
    case at::kBFloat16: return f(TypeTag<S>{}, TypeTag<c10::BFloat16>{});
    default:
      DK_CHECK(false, teacher_name, " must be fp32, fp64, bf16 or fp16 (got ", teacher, ")");
  }
}

// The dtype pairs the ops' argument checks admit: both fp64, or any two of
// fp32/bf16/fp16 (10 instantiations, not 4 x 4). f gets a TypeTag of each
// type; the names are the arguments' as the error messages give them.
template <typename F>
void dispatch_input_types(at::ScalarType student, at::ScalarType teacher,
                          const char* student_name, const char* teacher_name, F&& f) {
  switch (student) {
    case at::kDouble: return f(TypeTag<double>{}, TypeTag<double>{});
    case at::kFloat: return dispatch_teacher_type<float>(teacher, teacher_name, f);
    case at::kHalf: return dispatch_teacher_type<c10::Half>(teacher, teacher_name, f);
    case at::kBFloat16: return dispatch_teacher_type<c10::BFloat16>(teacher, teacher_name, f);
    default:
      DK_CHECK(false, student_name, " must be fp32, fp64, bf16 or fp16 (got ", student, ")");
  }
}

}  // namespace distillkit
