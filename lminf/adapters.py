"""Small per-family adapters for the families that do not fit transformers' extension points
as they are: each is applied by `lminf.patch` (a `Family.prepare`) and undone by `unpatch`.
Written here against the modules' public attributes; no modeling file is copied.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPLEMENTATION = "lminf"  # the name lminf.patching registers its attention function under


@dataclass
class Undo:
    """What an adapter changed; `remove()` puts it back (a torch hook handle's interface)."""

    steps: list = field(default_factory=list)

    def remove(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


def grow_gptj_table(model: PreTrainedModel) -> Undo:
    """GPT-J looks its rotary angles up in a sinusoid table sized to its training length; past
    it the lookup fails. Grow the table (with transformers' own function) before a forward needs
    it, as the original LM-Infinite code did."""
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    def grow(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        positions = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        needed, table = int(positions.max()) + 1, module.embed_positions
        if needed > table.shape[0]:
            grown = create_sinusoidal_positions(max(needed, 2 * table.shape[0]), module.pos_embd_dim)
            module.embed_positions = grown.to(table.device, table.dtype)

    rotary = next(m for m in model.modules() if type(m).__name__ == "GPTJRotaryEmbedding")
    return Undo([rotary.register_forward_pre_hook(grow, with_kwargs=True).remove])


def mpt_attention(model: PreTrainedModel) -> Undo:
    """MPT computes attention inside its module, with an ALiBi table of its training length, and
    its model cannot switch attention implementations. The adapter (1) points the model's config
    at lminf, so the model's own `create_causal_mask` call returns lminf's Layout, (2) replaces
    each attention module's forward by one that projects q, k, v as MPT does and calls lminf's
    attention with the ALiBi slopes (the model's own `build_mpt_alibi_tensor`)."""
    from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

    config = model.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = IMPLEMENTATION
    undo = Undo([lambda: setattr(config, "_attn_implementation_internal", previous)])
    bias_max = config.attn_config.alibi_bias_max
    for module in model.modules():
        if isinstance(module, MptAttention):
            # The table's first column is -1 x the slope of each head (its last is 0).
            module._lminf_alibi = -build_mpt_alibi_tensor(module.n_heads, 2, bias_max)[:, 0, 0].double()
            module.forward = types.MethodType(_mpt_forward, module)
            undo.steps.append(lambda m=module: (delattr(m, "forward"), delattr(m, "_lminf_alibi")))
    return undo


def _mpt_forward(self, hidden_states: torch.Tensor, position_bias=None, cache=None, attention_mask=None, **kwargs):
    batch, length = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    out, _ = ALL_ATTENTION_FUNCTIONS[IMPLEMENTATION](self, q, k, v, attention_mask, scaling=self.softmax_scale, **kwargs)
    return self.out_proj(out.reshape(batch, length, -1)), None
