// Host-side pieces shared by the CPU and CUDA coordinate-wise LSTM kernels (docs/math.md §8).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

#include <cstdint>

namespace distillkit {

constexpr int kLstmMaxLayers = 8;
constexpr int64_t kLstmMaxHidden = 128;
// a = max(log(|g| + eps) / p, -1): eps only keeps log finite at g = 0, where
// any eps <= e^-p gives the clamped value -1.
constexpr double kLstmPreprocessEps = 1e-8;

// The shapes of one call, read from the weights. Layer l has input size
// input[l] (2 for layer 0: the preprocessed gradient (a, b)) and hidden size
// hidden[l]; its state columns start at offset[l] of the packed (P, width)
// h and c.
struct LstmShape {
  int64_t P = 0;
  int layers = 0;
  int64_t input[kLstmMaxLayers] = {};
  int64_t hidden[kLstmMaxLayers] = {};
  int64_t offset[kLstmMaxLayers] = {};
  int64_t width = 0;
  bool head = false;
};

// Checks every forward argument (dtype fp32/fp64 and device shared by all,
// shapes consistent with the weights, 1 <= layers <= kLstmMaxLayers, hidden
// sizes in [1, kLstmMaxHidden], head_weight (1, H_L) with head_bias (1,) or
// neither (then H_L = 1), finite preprocess_p > 0 and finite output_scale) and
// returns the shapes. Throws ValueError naming the argument.
LstmShape check_coordinate_lstm_args(const at::Tensor& grad, const at::Tensor& params,
                                     const at::Tensor& h, const at::Tensor& c,
                                     at::TensorList w_ih, at::TensorList w_hh,
                                     at::TensorList bias,
                                     const std::optional<at::Tensor>& head_weight,
                                     const std::optional<at::Tensor>& head_bias,
                                     double preprocess_p, double output_scale);

// The incoming gradients of the backward: grad_params_out like grad, the
// optional state gradients like h.
void check_coordinate_lstm_backward_args(const at::Tensor& grad_params_out,
                                         const std::optional<at::Tensor>& grad_h_out,
                                         const std::optional<at::Tensor>& grad_c_out,
                                         const at::Tensor& grad, const at::Tensor& h);

// An optional tensor made contiguous, or an undefined tensor when absent (the
// kernels then take a null pointer).
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t);

}  // namespace distillkit
