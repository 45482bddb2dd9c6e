// A decoding step's layer around its attention, for Llama-shaped layers with float32 or 4-bit
// weights on a CPU (lminf/decoding/native.py builds it with one_query_cpu.cpp; lminf.decoding calls it).
//
// Why: one token through a layer is seven matrix-vector products and a few hundred numbers of
// arithmetic around them, but done as torch calls from Python it is about 130 calls a layer,
// whose overhead rivals the products on a small model (docs/history.md, native-layers-ab). Here the arithmetic is plain loops and
// the products are torch's (at::linear: MKL's where torch has it; the int4 kernel for 4-bit
// weights, as lminf.weights.int4 calls it).
//
// enter: x (1, 1, hidden) -> query (1, Hq, D), key (1, Hkv, 1, D), value (1, Hkv, 1, D): RMSNorm,
//   the q, k, v projections, q and k rotated (x * cos + rotate_half(x) * sin, signed_sin = sin
//   with its first half negated, as lminf.decoding.native_stack passes it).
// leave: x and the attention's output (1, Hq, D) -> x after the layer: the output projection
//   and residual, RMSNorm, the SiLU-gated MLP and residual.
// Each computes what tests/test_native.py's float64 formulas of the same name compute, in float32.
// layers: every layer of a step in one call (enter, the cache write, lminf::one_query, leave), so
//   no Python runs between layers (docs/history.md, native-stack-ab).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
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

// A layer's products as lminf.decoding.native_stack.products gives them: each one's tensors (counts[i]
// of them, in turn): a float32 weight (groups[i] == 0), or per part of a 4-bit layer its packed
// codes and scales (groups[i] its group; the parts' products summed, as lminf.weights.int4).
struct Products {
  at::TensorList tensors;
  at::IntArrayRef counts, groups;
  const c10::List<Bias>& biases;
  std::vector<int64_t> first;  // where each product's tensors start

  Products(at::TensorList t, at::IntArrayRef c, at::IntArrayRef g, const c10::List<Bias>& b)
      : tensors(t), counts(c), groups(g), biases(b) {
    TORCH_CHECK(c.size() == g.size() && c.size() == b.size(), "lminf: counts, groups and biases, one each a product");
    int64_t at = 0;
    for (const int64_t n : c) {
      TORCH_CHECK(n >= 1, "lminf: a product has tensors");
      first.push_back(at);
      at += n;
    }
    TORCH_CHECK(at == static_cast<int64_t>(t.size()), "lminf: the products' tensors, as many as their counts say");
  }
  int64_t size() const { return static_cast<int64_t>(counts.size()); }

  // h (1, K) float32 -> product i's output (1, N) float32.
  Tensor operator()(int64_t i, const Tensor& h) const {
    const Tensor* t = tensors.data() + first[i];
    const Bias bias = biases.get(i);
    if (groups[i] == 0) {
      TORCH_CHECK(counts[i] == 1 && t[0].scalar_type() == at::kFloat, "lminf: a float product is one float32 weight");
      return at::linear(h, t[0], bias);
    }
    TORCH_CHECK(counts[i] % 2 == 0, "lminf: a 4-bit product is (packed codes, scales) per part");
    const Tensor input = h.to(at::kBFloat16);  // the int4 kernel reads bfloat16 (lminf.weights.int4.COMPUTE)
    Tensor y = at::_weight_int4pack_mm_for_cpu(input, t[0], groups[i], t[1]).to(at::kFloat);
    for (int64_t j = 2; j < counts[i]; j += 2) y.add_(at::_weight_int4pack_mm_for_cpu(input, t[j], groups[i], t[j + 1]).to(at::kFloat));
    if (bias.has_value()) y.add_(*bias);
    return y;
  }

  // Products [from, to) of h, side by side (1, their outputs).
  Tensor side_by_side(int64_t from, int64_t to, const Tensor& h) const {
    if (to - from == 1) return (*this)(from, h);
    std::vector<Tensor> outputs;
    for (int64_t i = from; i < to; ++i) outputs.push_back((*this)(i, h));
    return at::cat(outputs, 1);
  }
};

// x (1, 1, hidden) -> (query (1, Hq, D), key (1, Hkv, 1, D), value (1, Hkv, 1, D)): products
// [from, to)'s outputs side by side are [q | k | v].
std::tuple<Tensor, Tensor, Tensor> enter_with(const Products& products, int64_t from, int64_t to, const Tensor& x,
                                              const Tensor& norm, double eps, const Tensor& cos,
                                              const Tensor& signed_sin, int64_t n_q, int64_t head_dim) {
  for (const auto* t : {&x, &norm, &cos, &signed_sin}) check(*t, "enter");
  TORCH_CHECK(norm.numel() == x.numel() && cos.numel() == head_dim && signed_sin.numel() == head_dim && head_dim % 2 == 0,
              "lminf::enter: x (1, 1, hidden), norm (hidden), cos and signed_sin (D), D even");
  TORCH_CHECK(0 <= from && from < to && to <= products.size(), "lminf::enter: at least one product");
  const Tensor y = products.side_by_side(from, to, normed(x, norm, eps));
  const int64_t heads = y.size(1) / head_dim, n_kv = (heads - n_q) / 2;
  TORCH_CHECK(y.is_contiguous() && heads * head_dim == y.size(1) && n_q + 2 * n_kv == heads && n_kv > 0,
              "lminf::enter: the products give n_q query heads, then as many key heads as value heads");
  rotate(y.data_ptr<float>(), n_q + n_kv, head_dim, cos.data_ptr<float>(), signed_sin.data_ptr<float>());
  const int64_t n_qk = (n_q + n_kv) * head_dim;
  return {y.narrow(1, 0, n_q * head_dim).view({1, n_q, head_dim}), y.narrow(1, n_q * head_dim, n_kv * head_dim).view({1, n_kv, 1, head_dim}),
          y.narrow(1, n_qk, n_kv * head_dim).view({1, n_kv, 1, head_dim})};
}

std::tuple<Tensor, Tensor, Tensor> enter(const Tensor& x, const Tensor& norm, double eps, at::TensorList weights,
                                         at::IntArrayRef counts, at::IntArrayRef groups, const c10::List<Bias>& biases,
                                         const Tensor& cos, const Tensor& signed_sin, int64_t n_q, int64_t head_dim) {
  const Products products(weights, counts, groups, biases);
  return enter_with(products, 0, products.size(), x, norm, eps, cos, signed_sin, n_q, head_dim);
}

// x (1, 1, hidden) and the attention's output (1, Hq, D) -> x after the layer: products [from, to) are
// the output projection, then those whose outputs side by side are [gate | up], then the down projection.
Tensor leave_with(const Products& products, int64_t from, int64_t to, const Tensor& x, const Tensor& attended,
                  const Tensor& norm, double eps) {
  for (const auto* t : {&x, &norm}) check(*t, "leave");
  TORCH_CHECK(norm.numel() == x.numel(), "lminf::leave: x (1, 1, hidden), norm (hidden)");
  TORCH_CHECK(0 <= from && from + 3 <= to && to <= products.size(), "lminf::leave: the output projection, gate and up, down");
  Tensor y = products(from, attended.reshape({1, -1}).to(at::kFloat));
  y.add_(x.view({1, -1}));  // the residual: x + o(attended)
  const Tensor gate_up = products.side_by_side(from + 1, to - 1, normed(y, norm, eps));
  const int64_t inner = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.is_contiguous() && 2 * inner == gate_up.size(1), "lminf::leave: gate and up alike");
  float* g = gate_up.data_ptr<float>();
  const float* u = g + inner;
  for (int64_t i = 0; i < inner; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];  // silu(gate) * up, over gate
  y.add_(products(to - 1, gate_up.narrow(1, 0, inner)));
  return y.view({1, 1, -1});
}

Tensor leave(const Tensor& x, const Tensor& attended, const Tensor& norm, double eps, at::TensorList weights,
             at::IntArrayRef counts, at::IntArrayRef groups, const c10::List<Bias>& biases) {
  const Products products(weights, counts, groups, biases);
  return leave_with(products, 0, products.size(), x, attended, norm, eps);
}

// Every decoder layer of a decoding step, in one call (no Python between the layers: at 1k
// context that was about a tenth of a float32 step). Per layer i: enter; its key and value written
// into its cache, keys[i] and values[i] (1, Hkv, S, D): last, after the newest stored one moved to
// row moves[i] first where moves[i] >= 0 (lminf.caches.LambdaLayer.reserve_one made the room); the
// attention of the query over all S keys (lminf::one_query, the first far_cos.size(0) keys turned
// by far_cos and far_sin as it reads them); leave. -> x after the last layer.
// The products of every layer in turn, enter's then leave's: per_layer[2 i] and per_layer[2 i + 1]
// of them; norms and eps likewise (input_layernorm, post_attention_layernorm).
Tensor layers(const Tensor& x, const Tensor& cos, const Tensor& signed_sin, at::TensorList norms, at::ArrayRef<double> eps,
              at::TensorList weights, at::IntArrayRef counts, at::IntArrayRef groups, const c10::List<Bias>& biases,
              at::IntArrayRef per_layer, at::TensorList keys, at::TensorList values, at::IntArrayRef moves, double scaling,
              int64_t n_q, int64_t head_dim, const std::optional<Tensor>& far_cos, const std::optional<Tensor>& far_sin) {
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(values.size()) == n_layers && static_cast<int64_t>(moves.size()) == n_layers &&
                  static_cast<int64_t>(norms.size()) == 2 * n_layers && static_cast<int64_t>(eps.size()) == 2 * n_layers &&
                  static_cast<int64_t>(per_layer.size()) == 2 * n_layers,
              "lminf::layers: keys, values and moves one a layer; norms, eps and per_layer two a layer");
  static const auto attend =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lminf::one_query", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, double, const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  const Products products(weights, counts, groups, biases);
  int64_t at = per_layer[0];
  auto [q, k, v] = enter_with(products, 0, at, x, norms[0], eps[0], cos, signed_sin, n_q, head_dim);
  Tensor h = x;
  for (int64_t i = 0; i < n_layers; ++i) {
    const Tensor &cached_k = keys[i], &cached_v = values[i];
    const int64_t n_kv = k.size(1), s = cached_k.size(2);
    TORCH_CHECK(cached_k.dim() == 4 && cached_k.size(0) == 1 && cached_k.size(1) == n_kv && cached_k.size(3) == head_dim &&
                    cached_v.sizes() == cached_k.sizes() && s >= 1 && moves[i] < s - 1,
                "lminf::layers: each layer's keys and values (1, Hkv, S, D), room for the new ones last");
    if (moves[i] >= 0) {  // the ring's oldest slot takes the newest stored key; the new one goes last
      cached_k.select(2, moves[i]).copy_(cached_k.select(2, s - 1));
      cached_v.select(2, moves[i]).copy_(cached_v.select(2, s - 1));
    }
    cached_k.select(2, s - 1).copy_(k.select(2, 0));  // in the cache's dtype: the query reads it as stored
    cached_v.select(2, s - 1).copy_(v.select(2, 0));
    const Tensor rows = q.reshape({n_kv, n_q / n_kv, head_dim});  // grouped query heads as rows of their key head
    const Tensor attended = attend.call(rows, cached_k.select(0, 0), cached_v.select(0, 0), scaling, far_cos, far_sin);
    h = leave_with(products, at, at + per_layer[2 * i + 1], h, attended, norms[2 * i + 1], eps[2 * i + 1]);
    at += per_layer[2 * i + 1];
    if (i + 1 < n_layers) {
      std::tie(q, k, v) = enter_with(products, at, at + per_layer[2 * i + 2], h, norms[2 * i + 2], eps[2 * i + 2], cos,
                                     signed_sin, n_q, head_dim);
      at += per_layer[2 * i + 2];
    }
  }
  TORCH_CHECK(at == products.size(), "lminf::layers: per_layer counts every product");
  return h;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(lminf, lib) {
  lib.def(
      "enter(Tensor x, Tensor norm, float eps, Tensor[] weights, int[] counts, int[] groups, Tensor?[] biases, "
      "Tensor cos, Tensor signed_sin, int n_q, int head_dim) -> (Tensor, Tensor, Tensor)");
  lib.def(
      "leave(Tensor x, Tensor attended, Tensor norm, float eps, Tensor[] weights, int[] counts, int[] groups, "
      "Tensor?[] biases) -> Tensor");
  lib.def(
      "layers(Tensor x, Tensor cos, Tensor signed_sin, Tensor[] norms, float[] eps, Tensor[] weights, int[] counts, "
      "int[] groups, Tensor?[] biases, int[] per_layer, Tensor[] keys, Tensor[] values, int[] moves, float scaling, "
      "int n_q, int head_dim, Tensor? far_cos=None, Tensor? far_sin=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(lminf, CPU, lib) {
  lib.impl("enter", &enter);
  lib.impl("leave", &leave);
  lib.impl("layers", &layers);
}
