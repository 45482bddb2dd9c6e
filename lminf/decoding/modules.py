"""A decoding step's layers as the model's own modules, in fewer, larger calls (lminf.decoding.step)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lminf.rope import rotate
from lminf.weights.int4 import Int4Linear


@dataclass
class Layer:
    """One decoder layer as the step runs it: fewer, larger calls than its modules make."""

    norm1: Callable
    qkv: Callable  # h (1, 1, hidden) -> [q | k | v]
    o_proj: torch.nn.Module
    norm2: Callable
    gate_up: Callable  # h -> [gate | up]
    act: Callable
    down: torch.nn.Module
    n_q: int  # query heads
    n_qk: int  # channels of q and k
    head_dim: int
    scaling: float

    def enter(self, x: torch.Tensor, turn: tuple[torch.Tensor, torch.Tensor]):
        """x (1, 1, hidden) -> query (1, Hq, D), key and value (1, Hkv, 1, D), rotated by turn = (cos, sin)."""
        qkv = self.qkv(self.norm1(x))  # (1, 1, [q | k | v])
        qk = rotate(qkv[..., : self.n_qk].view(1, -1, self.head_dim), turn)  # q's and k's heads, rotated together
        return qk[:, : self.n_q], qk[:, self.n_q :, None], qkv[..., self.n_qk :].view(1, -1, 1, self.head_dim)

    def leave(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x and the attention's output (1, Hq, D) -> x after the layer."""
        x = x + self.o_proj(attended.reshape(1, 1, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(self.act(gate) * up)

    @classmethod
    def of(cls, layer: torch.nn.Module, config) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        n_q = config.num_attention_heads
        return cls(
            norm1=_norm(layer.input_layernorm),
            qkv=_side_by_side([attn.q_proj, attn.k_proj, attn.v_proj]),
            o_proj=attn.o_proj,
            norm2=_norm(layer.post_attention_layernorm),
            gate_up=_side_by_side([mlp.gate_proj, mlp.up_proj]),
            act=mlp.act_fn,
            down=mlp.down_proj,
            n_q=n_q,
            n_qk=(n_q + config.num_key_value_heads) * attn.head_dim,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
        )


@dataclass
class Head:
    """The final norm and output layer, as modules."""

    norm: Callable
    output: torch.nn.Module

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x after the last layer -> the next token's logits (1, vocab), float32."""
        return self.output(self.norm(x))[:, -1].float()

    @classmethod
    def of(cls, model: PreTrainedModel) -> Head:
        return cls(_norm(model.get_decoder().norm), model.get_output_embeddings())


def joined(linears: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """4-bit layers as one (their codes shared: one kernel call) where they fit, the layers elsewhere."""
    return [Int4Linear.side_by_side(linears)] if Int4Linear.fit_side_by_side(linears) else linears


def _norm(module: torch.nn.Module) -> Callable:
    """The model's RMSNorm as torch's one call where it is the same sum (float32 weights: the
    module computes in float32 anyway); the module itself elsewhere."""
    eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
    if eps is None or weight is None or weight.dtype != torch.float32:
        return module
    return functools.partial(torch.nn.functional.rms_norm, normalized_shape=weight.shape, weight=weight, eps=eps)


def _side_by_side(linears: list[torch.nn.Module]) -> Callable:
    """h -> the layers' outputs concatenated, through `joined(linears)`: one call for 4-bit layers
    where they fit, the layers one after the other elsewhere (a float copy of the weights
    side by side would cost memory)."""
    layers = joined(linears)
    return layers[0] if len(layers) == 1 else lambda h: torch.cat([linear(h) for linear in layers], -1)
