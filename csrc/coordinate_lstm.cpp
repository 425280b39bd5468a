#include "coordinate_lstm.h"

#include <cmath>
#include <string>

#include "checks.h"

namespace distillkit {

// name[l], e.g. "w_ih[1]", for messages about one tensor of a list.
static std::string at_index(const char* name, size_t l) {
  return std::string(name) + "[" + std::to_string(l) + "]";
}

static void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& ref) {
  DK_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of grad (",
           ref.scalar_type(), "), got ", t.scalar_type());
  DK_CHECK_SAME_DEVICE(t, name, ref, "grad");
}

LstmShape check_coordinate_lstm_args(const at::Tensor& grad, const at::Tensor& params,
                                     const at::Tensor& h, const at::Tensor& c,
                                     at::TensorList w_ih, at::TensorList w_hh,
                                     at::TensorList bias,
                                     const std::optional<at::Tensor>& head_weight,
                                     const std::optional<at::Tensor>& head_bias,
                                     double preprocess_p, double output_scale) {
  DK_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
           "grad must be fp32 or fp64 (got ", grad.scalar_type(), ")");
  DK_CHECK_DIM(grad, "grad", 1);
  DK_CHECK(std::isfinite(preprocess_p) && preprocess_p > 0,
           "preprocess_p must be finite and > 0 (got ", preprocess_p, ")");
  DK_CHECK(std::isfinite(output_scale), "output_scale must be finite (got ", output_scale, ")");

  LstmShape shape;
  shape.P = grad.size(0);
  check_like(params, "params", grad);
  DK_CHECK(params.sizes() == grad.sizes(), "params must have the shape of grad (got ",
           params.sizes(), " and ", grad.sizes(), ")");

  const size_t layers = w_ih.size();
  DK_CHECK(layers >= 1 && layers <= static_cast<size_t>(kLstmMaxLayers), "w_ih must hold 1 to ",
           kLstmMaxLayers, " layers (got ", layers, ")");
  DK_CHECK(w_hh.size() == layers && bias.size() == layers,
           "w_ih, w_hh and bias must hold one tensor per layer (got ", layers, ", ", w_hh.size(),
           " and ", bias.size(), ")");
  shape.layers = static_cast<int>(layers);
  int64_t input = 2;
  for (size_t l = 0; l < layers; ++l) {
    const std::string hh = at_index("w_hh", l);
    DK_CHECK(w_hh[l].dim() == 2 && w_hh[l].size(0) == 4 * w_hh[l].size(1), hh,
             " must be (4H, H) (got shape ", w_hh[l].sizes(), ")");
    const int64_t hidden = w_hh[l].size(1);
    DK_CHECK(hidden >= 1 && hidden <= kLstmMaxHidden, hh, " gives hidden size ", hidden,
             ", expected 1 to ", kLstmMaxHidden);
    DK_CHECK(w_ih[l].dim() == 2 && w_ih[l].size(0) == 4 * hidden && w_ih[l].size(1) == input,
             at_index("w_ih", l), " must be (", 4 * hidden, ", ", input, ") (got shape ",
             w_ih[l].sizes(), ")");
    DK_CHECK(bias[l].dim() == 1 && bias[l].size(0) == 4 * hidden, at_index("bias", l),
             " must be (", 4 * hidden, ",) (got shape ", bias[l].sizes(), ")");
    check_like(w_ih[l], at_index("w_ih", l), grad);
    check_like(w_hh[l], hh, grad);
    check_like(bias[l], at_index("bias", l), grad);
    shape.input[l] = input;
    shape.hidden[l] = hidden;
    shape.offset[l] = shape.width;
    shape.width += hidden;
    input = hidden;
  }
  const int64_t last = shape.hidden[layers - 1];

  DK_CHECK(head_weight.has_value() == head_bias.has_value(),
           "head_weight and head_bias must be given together (or neither)");
  shape.head = head_weight.has_value();
  if (shape.head) {
    DK_CHECK(head_weight->dim() == 2 && head_weight->size(0) == 1 && head_weight->size(1) == last,
             "head_weight must be (1, ", last, ") (got shape ", head_weight->sizes(), ")");
    DK_CHECK(head_bias->dim() == 1 && head_bias->size(0) == 1,
             "head_bias must be (1,) (got shape ", head_bias->sizes(), ")");
    check_like(*head_weight, "head_weight", grad);
    check_like(*head_bias, "head_bias", grad);
  } else {
    DK_CHECK(last == 1, "without a head the last layer's hidden size must be 1 (the update); "
             "got ", last);
  }

  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{h, "h"}, {c, "c"}}) {
    DK_CHECK(t.dim() == 2 && t.size(0) == shape.P && t.size(1) == shape.width, name,
             " must be (P, sum of hidden sizes) = (", shape.P, ", ", shape.width,
             ") (got shape ", t.sizes(), ")");
    check_like(t, name, grad);
  }
  return shape;
}

void check_coordinate_lstm_backward_args(const at::Tensor& grad_params_out,
                                         const std::optional<at::Tensor>& grad_h_out,
                                         const std::optional<at::Tensor>& grad_c_out,
                                         const at::Tensor& grad, const at::Tensor& h) {
  DK_CHECK(grad_params_out.sizes() == grad.sizes(), "grad_params_out must have the shape of ",
           "grad (got ", grad_params_out.sizes(), " and ", grad.sizes(), ")");
  check_like(grad_params_out, "grad_params_out", grad);
  for (const auto& [t, name] : {std::pair<const std::optional<at::Tensor>&, const char*>{
                                     grad_h_out, "grad_h_out"},
                                 {grad_c_out, "grad_c_out"}}) {
    if (!t.has_value()) continue;
    DK_CHECK(t->sizes() == h.sizes(), name, " must have the shape of h (got ", t->sizes(),
             " and ", h.sizes(), ")");
    check_like(*t, name, grad);
  }
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace distillkit
