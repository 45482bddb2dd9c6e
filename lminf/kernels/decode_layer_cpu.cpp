// A decoding step's layer around its attention, for Llama-shaped layers with float32 weights on a
// CPU (lminf/kernels/native.py builds it with one_query_cpu.cpp; lminf.fast_decode calls it).
//
// Why: one token through a layer is seven matrix-vector products and a few hundred numbers of
// arithmetic around them, but done as torch calls from Python it is about 130 calls a layer:
// on a 2-core CPU a fifth to a quarter of a float32 step's time went to those calls, not to
// the products (docs/measurements/native-layers-ab.json). Here the arithmetic is plain loops and
// the products are torch's (at::linear: MKL's where torch has it), two calls a layer.
//
// enter: x (1, 1, hidden) -> query (1, Hq, D), key (1, Hkv, 1, D), value (1, Hkv, 1, D): RMSNorm,
//   the q, k, v projections, q and k rotated (x * cos + rotate_half(x) * sin, signed_sin = sin
//   with its first half negated, as lminf.kernels.decode_layers.rope).
// leave: x and the attention's output (1, Hq, D) -> x after the layer: the output projection
//   and residual, RMSNorm, the SiLU-gated MLP and residual.
// Each computes what lminf.kernels.decode_layers' functions of the same name compute, in float32.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {
using at::Tensor;
using Bias = std::optional<Tensor>;

// Llama's RMSNorm of x (n,) into out: w * (x * rsqrt(mean(x^2) + eps)), the mean summed in double.
void rms_norm(const float* x, const float* w, int64_t n, double eps, float* out) {
  double squares = 0.0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

Tensor normed(const Tensor& x, const Tensor& weight, double eps) {
  auto out = at::empty({1, x.numel()}, x.options());
  rms_norm(x.data_ptr<float>(), weight.data_ptr<float>(), x.numel(), eps, out.data_ptr<float>());
  return out;
}

// Each head of D in y (heads * D, in place) rotated by cos and signed_sin (D each).
void rotate(float* y, int64_t heads, int64_t d, const float* cos, const float* signed_sin) {
  std::vector<float> h(d);
  const int64_t half = d / 2;
  for (int64_t head = 0; head < heads; ++head) {
    float* x = y + head * d;
    std::copy(x, x + d, h.begin());
    for (int64_t t = 0; t < d; ++t) x[t] = h[t] * cos[t] + h[(t + half) % d] * signed_sin[t];
  }
}

void check(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "lminf::", what, " takes contiguous float32 CPU tensors");
}

std::tuple<Tensor, Tensor, Tensor> enter(const Tensor& x, const Tensor& norm, double eps, const Tensor& q_w,
                                         const Bias& q_b, const Tensor& k_w, const Bias& k_b, const Tensor& v_w,
                                         const Bias& v_b, const Tensor& cos, const Tensor& signed_sin, int64_t head_dim) {
  for (const auto* t : {&x, &norm, &cos, &signed_sin}) check(*t, "enter");
  TORCH_CHECK(norm.numel() == x.numel() && cos.numel() == head_dim && signed_sin.numel() == head_dim && head_dim % 2 == 0,
              "lminf::enter: x (1, 1, hidden), norm (hidden), cos and signed_sin (D), D even");
  const Tensor h = normed(x, norm, eps);
  Tensor q = at::linear(h, q_w, q_b), k = at::linear(h, k_w, k_b), v = at::linear(h, v_w, v_b);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && q.size(1) % head_dim == 0 && k.size(1) % head_dim == 0,
              "lminf::enter: projections of whole heads");
  rotate(q.data_ptr<float>(), q.size(1) / head_dim, head_dim, cos.data_ptr<float>(), signed_sin.data_ptr<float>());
  rotate(k.data_ptr<float>(), k.size(1) / head_dim, head_dim, cos.data_ptr<float>(), signed_sin.data_ptr<float>());
  return {q.view({1, -1, head_dim}), k.view({1, -1, 1, head_dim}), v.view({1, -1, 1, head_dim})};
}

Tensor leave(const Tensor& x, const Tensor& attended, const Tensor& o_w, const Bias& o_b, const Tensor& norm, double eps,
             const Tensor& gate_w, const Bias& gate_b, const Tensor& up_w, const Bias& up_b, const Tensor& down_w,
             const Bias& down_b) {
  for (const auto* t : {&x, &norm}) check(*t, "leave");
  TORCH_CHECK(norm.numel() == x.numel(), "lminf::leave: x (1, 1, hidden), norm (hidden)");
  Tensor y = at::linear(attended.reshape({1, -1}), o_w, o_b);
  y.add_(x.view({1, -1}));  // the residual: x + o(attended)
  const Tensor h = normed(y, norm, eps);
  Tensor gate = at::linear(h, gate_w, gate_b);
  const Tensor up = at::linear(h, up_w, up_b);
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(), "lminf::leave: gate and up alike");
  float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  for (int64_t i = 0; i < gate.numel(); ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];  // silu(gate) * up
  y.add_(at::linear(gate, down_w, down_b));
  return y.view({1, 1, -1});
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(lminf, lib) {
  lib.def(
      "enter(Tensor x, Tensor norm, float eps, Tensor q, Tensor? q_bias, Tensor k, Tensor? k_bias, Tensor v, "
      "Tensor? v_bias, Tensor cos, Tensor signed_sin, int head_dim) -> (Tensor, Tensor, Tensor)");
  lib.def(
      "leave(Tensor x, Tensor attended, Tensor o, Tensor? o_bias, Tensor norm, float eps, Tensor gate, "
      "Tensor? gate_bias, Tensor up, Tensor? up_bias, Tensor down, Tensor? down_bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(lminf, CPU, lib) {
  lib.impl("enter", &enter);
  lib.impl("leave", &leave);
}
