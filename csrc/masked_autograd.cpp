// The eager path of the masked layers and the channel gate as one extension call each, with the
// autograd node in C++ (bise_kernels/_ops.py calls these in plain eager mode when the selected
// backend is "cpp" or "cuda"; schemas in csrc/library.cpp).
//
// Each op is a torch::autograd::Function whose forward and backward make the calls of
// bise_kernels/backends/native.py in the same order with the same arguments (the fused mask pass
// `masked_weight` / `keep_weight`, the dense ATen GEMM or conv, the fused `masked_score_grad` /
// `keep_score_grad`; `channel_gate_forward` / `_backward`), so outputs and gradients are the same
// bits (tests/kernels/test_opcheck.py). What it saves per call against the Python
// autograd.Function: the autograd engine runs a C++ node (no GIL, no Python frames) and the backward
// makes its five dispatcher calls from C++. Like native.py, nothing weight-sized is saved for
// backward (W_eff is rebuilt for grad_x) and nothing waits for the device, so a step can be
// captured in a CUDA graph. Registered as CompositeImplicitAutograd: the one kernel serves every
// device; the fused passes inside dispatch to their CPU or CUDA implementation.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "checks.h"

namespace bise_autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------- the fused passes

// An op of bise_kernels_ext by name, typed with its kernels' C++ signature (csrc/cpu/*.cpp).
template <typename Signature>
c10::TypedOperatorHandle<Signature> ext_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using T = const at::Tensor&;

at::Tensor masked_weight(T weight, T scores, T thr, T cut, bool check_finite) {
  static const auto op = ext_op<at::Tensor(T, T, T, T, bool)>("bise_kernels_ext::masked_weight");
  return op.call(weight, scores, thr, cut, check_finite);
}

at::Tensor masked_score_grad(T grad_w_eff, T weight, T scores, T thr, T cut, const std::string& estimator,
                             double temperature, bool need_scores, bool need_weight) {
  static const auto op = ext_op<at::Tensor(T, T, T, T, T, std::string, double, bool, bool)>(
      "bise_kernels_ext::masked_score_grad");
  return op.call(grad_w_eff, weight, scores, thr, cut, estimator, temperature, need_scores, need_weight);
}

at::Tensor keep_weight(T weight, T keep) {
  static const auto op = ext_op<at::Tensor(T, T)>("bise_kernels_ext::keep_weight");
  return op.call(weight, keep);
}

at::Tensor keep_score_grad(T grad_w_eff, T weight, T scores, T keep, const std::string& estimator, double temperature,
                           bool need_scores, bool need_weight) {
  static const auto op =
      ext_op<at::Tensor(T, T, T, T, std::string, double, bool, bool)>("bise_kernels_ext::keep_score_grad");
  return op.call(grad_w_eff, weight, scores, keep, estimator, temperature, need_scores, need_weight);
}

// ----------------------------------------------------------------------------- mask sources

// How the estimator turns grad_W_eff into the score gradient (checked by the fused pass).
struct Estimator {
  std::string name;
  double temperature;
};

// The mask of a layer as the selection (thr, cut) of its scores: the rule is evaluated in each pass.
struct Selection {
  at::Tensor thr, cut;
  void check(T weight, const at::Tensor* scores, const char* name, at::DeviceType device) const {
    bise_checks::check_layer(weight, *scores, thr, cut, name, device);
  }
  std::vector<at::Tensor> tensors() const { return {thr, cut}; }
  static Selection from(const variable_list& saved, size_t first) { return {saved[first], saved[first + 1]}; }
  // check_finite: the forward's pass checks the scores and thr; the backward's recompute does not.
  at::Tensor weight(T w, T scores, bool check_finite) const { return masked_weight(w, scores, thr, cut, check_finite); }
  at::Tensor score_grad(T grad_w_eff, T w, T scores, const Estimator& e, bool need_s, bool need_w) const {
    return masked_score_grad(grad_w_eff, w, scores, thr, cut, e.name, e.temperature, need_s, need_w);
  }
};

// The mask packed once into a bool keep mask (the *_keep ops): the passes read it, not the scores.
struct Keep {
  at::Tensor keep;

  // scores: null for the forward, which reads only keep.
  // The scores' shape is checked first: a module's keep mask is made from its scores (a keep mask
  // of the wrong shape means scores of the wrong shape).
  void check(T weight, const at::Tensor* scores, const char* name, at::DeviceType device) const {
    if (scores != nullptr) {
      bise_checks::check_float(*scores, "scores", name, device);
      bise_checks::check_weight_shaped(weight, *scores, "scores", name);
    }
    bise_checks::check_keep_layer(weight, keep, name, device);
    if (scores == nullptr) return;
    TORCH_CHECK_VALUE(scores->sizes() == keep.sizes(), name, ": scores must have keep's shape ", keep.sizes(), ", got ",
                      scores->sizes());
  }
  std::vector<at::Tensor> tensors() const { return {keep}; }
  static Keep from(const variable_list& saved, size_t first) { return {saved[first]}; }
  at::Tensor weight(T w, T, bool) const { return keep_weight(w, keep); }
  at::Tensor score_grad(T grad_w_eff, T w, T scores, const Estimator& e, bool need_s, bool need_w) const {
    return keep_score_grad(grad_w_eff, w, scores, keep, e.name, e.temperature, need_s, need_w);
  }
};

// ----------------------------------------------------------------------------- dense layers

// t as 2-d (rows, last dim): reshape({-1, n}) cannot infer the rows of an empty t (n == 0: in_features or
// out_features 0), as reference.py's as_rows.
at::Tensor as_rows(T t) { return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)}); }

// F.linear and its backward as native.py's _linear_backward computes it.
struct Linear {
  void check(T x, T weight, const char* name) const {
    TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), name, ": x of shape ",
                      x.sizes(), " does not match weight of shape ", weight.sizes());
  }
  std::vector<int64_t> output_shape(T x, T weight) const {
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return shape;
  }
  at::Tensor forward(T x, T w_eff, const std::optional<at::Tensor>& bias, T) const {
    return at::linear(x, w_eff, bias);
  }
  at::Tensor grad_y(T grad_y, T) const { return grad_y.contiguous(); }
  at::Tensor grad_x(T grad_y, T, T w_eff) const { return at::matmul(grad_y, w_eff); }
  at::Tensor grad_w_eff(T grad_y, T x, T) const {
    return at::matmul(as_rows(grad_y).t(), as_rows(x));
  }
  at::Tensor grad_bias(T grad_y) const { return as_rows(grad_y).sum(0); }
  void save(AutogradContext*) const {}
  static Linear from(AutogradContext*) { return {}; }
};

// F.conv2d (zero padding) and its backward as native.py's _conv2d_backward computes it.
struct Conv2d {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  // As bise_kernels/_checks.py's conv geometry check: a ValueError naming the argument, where ATen's
  // conv2d would raise a RuntimeError of its own.
  void check(T x, T weight, const char* name) const {
    TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4, name, ": x and weight must be 4-d, got shapes ", x.sizes(),
                      " and ", weight.sizes());
    TORCH_CHECK_VALUE(weight.numel() > 0, name, ": weight of shape ", weight.sizes(),
                      " is empty: a masked conv2d has no weight to mask");
    const std::pair<const char*, const std::vector<int64_t>*> pairs[] = {
        {"stride", &stride}, {"padding", &padding}, {"dilation", &dilation}};
    for (const auto& [arg, values] : pairs) {
      const int64_t low = values == &padding ? 0 : 1;
      TORCH_CHECK_VALUE(values->size() == 2 && (*values)[0] >= low && (*values)[1] >= low, name, ": ", arg,
                        " must be two ints >= ", low, ", got ", at::IntArrayRef(*values));
    }
    int64_t channels = 0;
    TORCH_CHECK_VALUE(groups >= 1 && !__builtin_mul_overflow(weight.size(1), groups, &channels) &&
                          x.size(1) == channels && weight.size(0) % groups == 0,
                      name, ": groups=", groups, " does not fit x channels ", x.size(1), " and weight ", weight.sizes());
    for (int d = 0; d < 2; ++d) {
      // padded = size + 2 * padding, span = dilation * (kernel - 1) + 1, in int64 without overflow
      int64_t twice = 0, padded = 0, span = 0;
      const bool overflows = __builtin_mul_overflow(padding[d], int64_t{2}, &twice) ||
                             __builtin_add_overflow(x.size(2 + d), twice, &padded) ||
                             __builtin_mul_overflow(dilation[d], weight.size(2 + d) - 1, &span) ||
                             __builtin_add_overflow(span, int64_t{1}, &span);
      TORCH_CHECK_VALUE(!overflows, name, ": padding ", at::IntArrayRef(padding), " or dilation ",
                        at::IntArrayRef(dilation), " too large: the padded input or the kernel's span overflows int64");
      TORCH_CHECK_VALUE(padded >= span, name, ": kernel ", weight.sizes().slice(2), " (dilation ",
                        at::IntArrayRef(dilation), ") is larger than the padded input ", x.sizes().slice(2),
                        " + 2 * padding ", at::IntArrayRef(padding));
    }
  }
  // (N, out_channels, OH, OW) of a geometry that check() accepted (no overflow, kernel within the padded input).
  std::vector<int64_t> output_shape(T x, T weight) const {
    std::vector<int64_t> shape{x.size(0), weight.size(0)};
    for (int d = 0; d < 2; ++d) {
      const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
      shape.push_back((x.size(2 + d) + 2 * padding[d] - span) / stride[d] + 1);
    }
    return shape;
  }
  static bool channels_last(T t) {
    return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
  }
  // The output channels_last where x or the weight is, as ATen's conv2d picks and _ops.py's _conv_format
  // (W_eff, the mask pass's output, is contiguous: a channels_last weight alone would give a contiguous y).
  at::Tensor forward(T x, T w_eff, const std::optional<at::Tensor>& bias, T weight) const {
    const bool cl = channels_last(x) || channels_last(weight);
    return at::conv2d(x, w_eff, bias, stride, padding, dilation, groups)
        .contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  // channels_last when x is (so the backward needs no layout conversion), else contiguous.
  at::Tensor grad_y(T grad_y, T x) const {
    return grad_y.contiguous(channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  at::Tensor grad_x(T grad_y, T x, T w_eff) const {
    return std::get<0>(at::convolution_backward(grad_y, x, w_eff, std::nullopt, stride, padding, dilation, false,
                                                {0, 0}, groups, {true, false, false}));
  }
  // Only the weight's shape is read for the weight gradient.
  at::Tensor grad_w_eff(T grad_y, T x, T weight) const {
    return std::get<1>(at::convolution_backward(grad_y, x, weight, std::nullopt, stride, padding, dilation, false,
                                                {0, 0}, groups, {false, true, false}));
  }
  at::Tensor grad_bias(T grad_y) const { return grad_y.sum({0, 2, 3}); }
  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }
  static Conv2d from(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }
};

// ----------------------------------------------------------------------------- the composition

// y = layer(x, weight * mask, bias): the forward of a masked layer (check_finite in the mask pass).
template <class Layer, class Mask>
at::Tensor layer_forward(T x, T weight, const std::optional<at::Tensor>& bias, T scores, const Mask& mask,
                         const Layer& layer) {
  return layer.forward(x, mask.weight(weight, scores, true), bias, weight);
}

// (grad_x, grad_weight, grad_bias, grad_scores) of a masked layer, each undefined where not needed:
// grad_x from a recomputed W_eff (freed before the weight gradient), then grad_W_eff by the dense
// weight-gradient op, then one fused pass into the score gradient that masks grad_W_eff in place
// into the weight gradient when that is needed. At most one weight-sized temporary at a time.
template <class Layer, class Mask>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_backward(
    T grad_y_in, T x, T weight, T scores, const Mask& mask, const Layer& layer, const Estimator& est,
    std::array<bool, 4> needs) {
  const auto [need_x, need_w, need_b, need_s] = needs;
  const at::Tensor grad_y = layer.grad_y(grad_y_in, x);
  at::Tensor gx, gw, gb, gs;
  if (need_x) gx = layer.grad_x(grad_y, x, mask.weight(weight, scores, false));
  if (need_w || need_s) {
    at::Tensor grad_w_eff = layer.grad_w_eff(grad_y, x, weight).contiguous();
    if (need_s && !need_w && est.name == "ste" && scores.sizes() == weight.sizes() &&
        scores.scalar_type() == weight.scalar_type()) {
      // The STE score gradient of weight-shaped scores is grad_W_eff * W rounded once, as the fused
      // pass computes it: multiplied in place, no second weight-sized buffer (on the CPU a fresh one
      // is page faults and cache misses). CPU MLP step (bench_masked_cpu's 784-1024-1024-10, one
      // thread, interleaved with dense, 4 runs each, load 1.1-1.2): 1.36-1.38x -> 1.32-1.34x dense.
      gs = grad_w_eff.mul_(weight);
    } else {
      gs = mask.score_grad(grad_w_eff, weight, scores, est, need_s, need_w);  // masks grad_w_eff in place
      if (need_w) gw = grad_w_eff;
      if (!need_s) gs = at::Tensor();
    }
  }
  if (need_b) gb = layer.grad_bias(grad_y);
  return {gx, gw, gb, gs};
}

// ----------------------------------------------------------------------------- the autograd functions

// The gradients of a backward under create_graph=True, passed through unchanged; differentiating
// them raises (each depends on `inputs`: grad_y and the saved x, weight, scores). A public-API
// Function, not an Error node: torch 2.11 (the GPU machine) holds nodes in std::shared_ptr, 2.13 in
// c10::intrusive_ptr, so a hand-made node compiles against one of them only.
struct DifferentiableOnce : torch::autograd::Function<DifferentiableOnce> {
  // TensorList arguments: autograd counts their tensors as inputs (a std::vector argument it does not).
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList) {
    variable_list out;
    for (const at::Tensor& g : grads) out.push_back(g.alias());
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "bise_kernels' masked layers and channel gate are differentiable once: their straight-through "
                "gradient has no gradient of its own (a backward through the result of a backward with "
                "create_graph=True is not supported)");
  }
};

// A backward under create_graph=True (grad mode on): the gradients of `compute`, made without a graph,
// each raising if differentiated, as bise_kernels/_ops.py's _DifferentiableOnce, with its message:
// differentiating what the kernels compute gave a different wrong answer per backend.
template <class Compute>
variable_list differentiable_once(const Compute& compute, const variable_list& inputs) {
  if (!at::GradMode::is_enabled()) return compute();
  variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = compute();
  }
  variable_list defined;  // the Function's outputs must be defined tensors
  for (const at::Tensor& g : grads) {
    if (g.defined()) defined.push_back(g);
  }
  const variable_list once = DifferentiableOnce::apply(at::TensorList(defined), at::TensorList(inputs));
  for (size_t i = 0, j = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) grads[i] = once[j++];
  }
  return grads;
}

// The composition above as an autograd node; inputs x, weight, bias (nullopt when absent: no input
// then, so the scores are input 2 or 3), scores.
template <class Layer, class Mask>
struct MaskedLayer : torch::autograd::Function<MaskedLayer<Layer, Mask>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& scores, const Mask& mask,
                            const Layer& layer, const Estimator& est) {
    std::vector<at::Tensor> saved{x, weight, scores};
    for (const at::Tensor& t : mask.tensors()) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->saved_data["estimator"] = est.name;
    ctx->saved_data["temperature"] = est.temperature;
    ctx->saved_data["has_bias"] = bias.has_value();
    layer.save(ctx);
    return layer_forward(x, weight, bias, scores, mask, layer);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 4> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    has_bias && ctx->needs_input_grad(2), ctx->needs_input_grad(has_bias ? 3 : 2)};
    const Estimator est{ctx->saved_data["estimator"].toStringRef(), ctx->saved_data["temperature"].toDouble()};
    return differentiable_once(
        [&]() -> variable_list {
          auto [gx, gw, gb, gs] = layer_backward(grads[0], saved[0], saved[1], saved[2], Mask::from(saved, 3),
                                                 Layer::from(ctx), est, needs);
          // x, weight, bias, scores, then the mask, the layer and the estimator (no gradients).
          return {gx, gw, gb, gs, at::Tensor(), at::Tensor(), at::Tensor()};
        },
        {grads[0], saved[0], saved[1], saved[2]});
  }
};

// y = x * keep(scores) along dim; inputs x, scores.
struct ChannelGate : torch::autograd::Function<ChannelGate> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scores, const Selection& sel,
                            int64_t dim, const Estimator& est) {
    static const auto op = ext_op<at::Tensor(T, T, T, T, int64_t)>("bise_kernels_ext::channel_gate_forward");
    ctx->save_for_backward({x, scores, sel.thr, sel.cut});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["estimator"] = est.name;
    ctx->saved_data["temperature"] = est.temperature;
    return op.call(x, scores, sel.thr, sel.cut, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        ext_op<std::tuple<at::Tensor, at::Tensor>(T, T, T, T, T, int64_t, std::string, double, bool, bool)>(
            "bise_kernels_ext::channel_gate_backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_s = ctx->needs_input_grad(1);
    return differentiable_once(
        [&]() -> variable_list {
          auto [gx, gs] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["dim"].toInt(),
                                  ctx->saved_data["estimator"].toStringRef(),
                                  ctx->saved_data["temperature"].toDouble(), need_x, need_s);
          return {need_x ? gx : at::Tensor(), need_s ? gs : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
        },
        {grads[0], saved[0], saved[1]});
  }
};

// ----------------------------------------------------------------------------- the ops

// What the Python path checks before its kernels run (bise_kernels/_checks.py names the same
// arguments): x's dtype and device against weight, the mask, the layer's shapes.
template <class Layer, class Mask>
void check_layer_args(const char* name, T x, T weight, const at::Tensor* scores, const Mask& mask,
                      const Layer& layer) {
  const at::DeviceType device = x.device().type();
  bise_checks::check_float(x, "x", name, device);
  mask.check(weight, scores, name, device);
  bise_checks::check_same_device(weight, "weight", x, "x", name);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), name, ": weight has dtype ", weight.scalar_type(),
                   " but x has ", x.scalar_type());
  layer.check(x, weight, name);
}

// Whether a bias is given, after checking its device, dtype and shape.
bool check_bias(const char* name, const std::optional<at::Tensor>& bias, T x, T weight) {
  if (!bias.has_value() || !bias->defined()) return false;
  bise_checks::check_same_device(*bias, "bias", x, "x", name);
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), name, ": bias has dtype ", bias->scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), name, ": bias must have shape (",
                    weight.size(0), ",), got ", bias->sizes());
  return true;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Each layer op three ways, with the same checks: <op> (the autograd node: the eager path),
// <op>_forward and <op>_backward (the kernels of backends/native.py, which the Python custom ops
// call under torch.compile, export and opcheck).
template <class Layer, class Mask>
struct LayerOp {
  const char* name;
  Mask mask;
  Layer layer;

  at::Tensor apply(T x, T weight, const std::optional<at::Tensor>& bias, T scores, const std::string& estimator,
                   double temperature) const {
    check_layer_args(name, x, weight, &scores, mask, layer);
    const bool has_bias = check_bias(name, bias, x, weight);
    bise_checks::check_estimator(estimator, temperature, name);
    return MaskedLayer<Layer, Mask>::apply(x, weight, has_bias ? bias : std::nullopt, scores, mask, layer,
                                           Estimator{estimator, temperature});
  }
  // scores: null for a Keep mask (its forward reads only the mask).
  at::Tensor forward(T x, T weight, const std::optional<at::Tensor>& bias, const at::Tensor* scores) const {
    check_layer_args(name, x, weight, scores, mask, layer);
    const bool has_bias = check_bias(name, bias, x, weight);
    return layer_forward(x, weight, has_bias ? bias : std::nullopt, scores ? *scores : at::Tensor(), mask, layer);
  }
  Grads backward(T grad_y, T x, T weight, T scores, const std::string& estimator, double temperature,
                 std::array<bool, 4> needs) const {
    check_layer_args(name, x, weight, &scores, mask, layer);
    TORCH_CHECK_TYPE(grad_y.defined(), name, ": grad_y must be a tensor");
    bise_checks::check_grad_y(grad_y, x, layer.output_shape(x, weight), "the output's shape", name);
    bise_checks::check_estimator(estimator, temperature, name);
    return layer_backward(grad_y, x, weight, scores, mask, layer, Estimator{estimator, temperature}, needs);
  }
};

Conv2d conv2d(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return {stride.vec(), padding.vec(), dilation.vec(), groups};
}

LayerOp<Linear, Selection> linear_op(const char* name, T thr, T cut) { return {name, {thr, cut}, {}}; }
LayerOp<Linear, Keep> linear_keep_op(const char* name, T keep) { return {name, {keep}, {}}; }
LayerOp<Conv2d, Selection> conv2d_op(const char* name, T thr, T cut, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  return {name, {thr, cut}, conv2d(stride, padding, dilation, groups)};
}
LayerOp<Conv2d, Keep> conv2d_keep_op(const char* name, T keep, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  return {name, {keep}, conv2d(stride, padding, dilation, groups)};
}

using Bias = const std::optional<at::Tensor>&;
using Ints = at::IntArrayRef;
using Needs = std::array<bool, 4>;

at::Tensor masked_linear(T x, T weight, Bias bias, T scores, T thr, T cut, std::string estimator, double temperature) {
  return linear_op("bise_kernels_ext::masked_linear", thr, cut).apply(x, weight, bias, scores, estimator, temperature);
}
at::Tensor masked_linear_forward(T x, T weight, Bias bias, T scores, T thr, T cut) {
  return linear_op("bise_kernels_ext::masked_linear_forward", thr, cut).forward(x, weight, bias, &scores);
}
Grads masked_linear_backward(T grad_y, T x, T weight, T scores, T thr, T cut, std::string estimator,
                             double temperature, Needs needs) {
  return linear_op("bise_kernels_ext::masked_linear_backward", thr, cut)
      .backward(grad_y, x, weight, scores, estimator, temperature, needs);
}

at::Tensor masked_linear_keep(T x, T weight, Bias bias, T scores, T keep, std::string estimator, double temperature) {
  return linear_keep_op("bise_kernels_ext::masked_linear_keep", keep)
      .apply(x, weight, bias, scores, estimator, temperature);
}
at::Tensor masked_linear_keep_forward(T x, T weight, Bias bias, T keep) {
  return linear_keep_op("bise_kernels_ext::masked_linear_keep_forward", keep).forward(x, weight, bias, nullptr);
}
Grads masked_linear_keep_backward(T grad_y, T x, T weight, T scores, T keep, std::string estimator,
                                  double temperature, Needs needs) {
  return linear_keep_op("bise_kernels_ext::masked_linear_keep_backward", keep)
      .backward(grad_y, x, weight, scores, estimator, temperature, needs);
}

at::Tensor masked_conv2d(T x, T weight, Bias bias, T scores, T thr, T cut, Ints stride, Ints padding, Ints dilation,
                         int64_t groups, std::string estimator, double temperature) {
  return conv2d_op("bise_kernels_ext::masked_conv2d", thr, cut, stride, padding, dilation, groups)
      .apply(x, weight, bias, scores, estimator, temperature);
}
at::Tensor masked_conv2d_forward(T x, T weight, Bias bias, T scores, T thr, T cut, Ints stride, Ints padding,
                                 Ints dilation, int64_t groups) {
  return conv2d_op("bise_kernels_ext::masked_conv2d_forward", thr, cut, stride, padding, dilation, groups)
      .forward(x, weight, bias, &scores);
}
Grads masked_conv2d_backward(T grad_y, T x, T weight, T scores, T thr, T cut, Ints stride, Ints padding,
                             Ints dilation, int64_t groups, std::string estimator, double temperature, Needs needs) {
  return conv2d_op("bise_kernels_ext::masked_conv2d_backward", thr, cut, stride, padding, dilation, groups)
      .backward(grad_y, x, weight, scores, estimator, temperature, needs);
}

at::Tensor masked_conv2d_keep(T x, T weight, Bias bias, T scores, T keep, Ints stride, Ints padding, Ints dilation,
                              int64_t groups, std::string estimator, double temperature) {
  return conv2d_keep_op("bise_kernels_ext::masked_conv2d_keep", keep, stride, padding, dilation, groups)
      .apply(x, weight, bias, scores, estimator, temperature);
}
at::Tensor masked_conv2d_keep_forward(T x, T weight, Bias bias, T keep, Ints stride, Ints padding, Ints dilation,
                                      int64_t groups) {
  return conv2d_keep_op("bise_kernels_ext::masked_conv2d_keep_forward", keep, stride, padding, dilation, groups)
      .forward(x, weight, bias, nullptr);
}
Grads masked_conv2d_keep_backward(T grad_y, T x, T weight, T scores, T keep, Ints stride, Ints padding,
                                  Ints dilation, int64_t groups, std::string estimator, double temperature,
                                  Needs needs) {
  return conv2d_keep_op("bise_kernels_ext::masked_conv2d_keep_backward", keep, stride, padding, dilation, groups)
      .backward(grad_y, x, weight, scores, estimator, temperature, needs);
}

at::Tensor channel_gate(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut,
                        int64_t dim, std::string estimator, double temperature) {
  constexpr const char* name = "bise_kernels_ext::channel_gate";
  bise_checks::check_gate(x, scores, thr, cut, dim, name, x.device().type());
  bise_checks::check_estimator(estimator, temperature, name);
  return ChannelGate::apply(x, scores, Selection{thr, cut}, dim, Estimator{estimator, temperature});
}

}  // namespace
}  // namespace bise_autograd

TORCH_LIBRARY_IMPL(bise_kernels_ext, CompositeImplicitAutograd, m) {
  m.impl("masked_linear", &bise_autograd::masked_linear);
  m.impl("masked_linear_keep", &bise_autograd::masked_linear_keep);
  m.impl("masked_conv2d", &bise_autograd::masked_conv2d);
  m.impl("masked_conv2d_keep", &bise_autograd::masked_conv2d_keep);
  m.impl("channel_gate", &bise_autograd::channel_gate);
  m.impl("masked_linear_forward", &bise_autograd::masked_linear_forward);
  m.impl("masked_linear_backward", &bise_autograd::masked_linear_backward);
  m.impl("masked_linear_keep_forward", &bise_autograd::masked_linear_keep_forward);
  m.impl("masked_linear_keep_backward", &bise_autograd::masked_linear_keep_backward);
  m.impl("masked_conv2d_forward", &bise_autograd::masked_conv2d_forward);
  m.impl("masked_conv2d_backward", &bise_autograd::masked_conv2d_backward);
  m.impl("masked_conv2d_keep_forward", &bise_autograd::masked_conv2d_keep_forward);
  m.impl("masked_conv2d_keep_backward", &bise_autograd::masked_conv2d_keep_backward);
}
