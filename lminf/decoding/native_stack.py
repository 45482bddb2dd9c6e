"""Every decoder layer of a decoding step as one call of lminf's C++ layers (lminf::layers in
lminf/decoding/decode_layer_cpu.cpp): the norms, products, rotation, attention over the cache
(lminf/decoding/one_query_cpu.cpp) and the cache writes of all layers, no Python between them.

Why: on a CPU much of a step's time is per-call overhead (the model's forward makes about 110
torch calls a layer); one call for the whole stack leaves the products and the attention's reads
(docs/history.md, native-stack-ab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lminf.decoding import native
from lminf.decoding.modules import joined
from lminf.weights.int4 import Int4Linear


def fits(model: PreTrainedModel) -> bool:
    """Whether every layer is what the C++ layers compute: float32 nn.Linear or 4-bit Int4Linear
    products on a CPU (float32 activations), Llama's RMSNorm, a SiLU-gated MLP."""
    if model.dtype != torch.float32 or model.device.type != "cpu":
        return False
    decoder = model.get_decoder()
    for layer in decoder.layers:
        act = type(layer.mlp.act_fn)
        if act is not torch.nn.SiLU and act.__name__ != "SiLUActivation":  # transformers' own
            return False
    linears = [m for layer in decoder.layers for m in layer.modules() if "Linear" in type(m).__name__]
    floats = [m for m in linears if not isinstance(m, Int4Linear)]
    plain = all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in floats)
    norms = [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return plain and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms)


@dataclass
class NativeStack:
    """A model's decoder layers as lminf::layers reads them."""

    ops: object  # torch.ops.lminf
    weights: tuple  # the norms, eps, then the products' tensors, counts, groups, biases and per_layer
    scaling: float
    n_q: int
    n_kv: int
    head_dim: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> NativeStack | None:
        """The model's stack; None where it does not `fit` or lminf's C++ kernels do not build."""
        if not fits(model) or native.layers() is None:
            return None
        norms, eps, tensors, counts, groups, biases, per_layer = [], [], [], [], [], [], []
        for layer in model.get_decoder().layers:
            attn, mlp = layer.self_attn, layer.mlp
            before = [attn.q_proj, attn.k_proj, attn.v_proj]
            after = [attn.o_proj, *joined([mlp.gate_proj, mlp.up_proj]), mlp.down_proj]
            for norm, linears in ((layer.input_layernorm, joined(before)), (layer.post_attention_layernorm, after)):
                norms.append(norm.weight)
                eps.append(norm.variance_epsilon)
                for into, part in zip((tensors, counts, groups, biases), products(linears), strict=True):
                    into += part
                per_layer.append(len(linears))
        config, attn = model.config, model.get_decoder().layers[0].self_attn
        weights = (norms, eps, tensors, counts, groups, biases, per_layer)
        return cls(native.layers(), weights, attn.scaling, config.num_attention_heads, config.num_key_value_heads, attn.head_dim)

    def __call__(self, x: torch.Tensor, turn, keys: list, values: list, moves: list[int], far_turn: tuple) -> torch.Tensor:
        """x (1, 1, hidden) -> x after every layer; turn: (cos, sin) (1, 1, D) of the new token;
        keys[i] and values[i] (1, Hkv, S, D) take layer i's new key and value last (the newest
        stored ones moved to row moves[i] first, where >= 0); far_turn: () or (cos, sin) (n_far, D),
        the rotation of the first n_far keys as they are read."""
        cos, sin = turn
        half = cos.shape[-1] // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)  # rotate_half(x) * sin as roll(x) * signed_sin
        shape = self.scaling, self.n_q, self.head_dim
        return self.ops.layers(x, cos, signed_sin, *self.weights, keys, values, moves, *shape, *far_turn)


def products(linears: list[torch.nn.Module]) -> tuple[list, list[int], list[int], list]:
    """Products as decode_layer_cpu.cpp reads them: (tensors, counts, groups, biases): per product its
    tensors (a float weight; or per part of a 4-bit layer its packed codes and scales), how many,
    its 4-bit group (0: float) and its bias or None."""
    tensors, counts, groups, biases = [], [], [], []
    for linear in linears:
        if isinstance(linear, Int4Linear):
            weights = linear.weights()
            own = [t for part in zip(weights.packed, weights.scale_zero, strict=True) for t in part]
            group, bias = weights.group, weights.bias
        else:
            own, group, bias = [linear.weight], 0, linear.bias
        tensors += own
        counts.append(len(own))
        groups.append(group)
        biases.append(bias)
    return tensors, counts, groups, biases
