// Argument checks whose messages name the argument and what was expected.
// They raise ValueError in Python (TORCH_CHECK_VALUE), never a device assert.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define DK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "distillkit: ", __VA_ARGS__)

#define DK_CHECK_DIM(t, name, n)                                             \
  DK_CHECK((t).dim() == (n), name, " must be ", n, "-D (got shape ",        \
           (t).sizes(), ")")

#define DK_CHECK_FLOATING(t, name)                                           \
  DK_CHECK(at::isFloatingType((t).scalar_type()), name,                     \
           " must be a floating tensor (fp32, fp64, bf16 or fp16), got ",    \
           (t).scalar_type())

#define DK_CHECK_SAME_DEVICE(a, a_name, b, b_name)                           \
  DK_CHECK((a).device() == (b).device(), a_name, " must be on the same ",    \
           "device as ", b_name, " (got ", (a).device(), " and ",            \
           (b).device(), ")")
