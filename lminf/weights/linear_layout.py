"""How linear layers' weights lie in memory: the same values, a faster order for decoding on a CPU.

A decoding step multiplies one row by every weight matrix, so it is bound by reading them.
With float32 on CPU, torch's matrix-vector path reads a wide matrix (more outputs than inputs:
the output layer, the MLP's inputs) faster when it is stored input-major (W.T contiguous, seen
through a transposed view, which is what F.linear then multiplies without a copy); narrow ones
read slower that way, so they stay as they are. Prefill does not slow down.

Only the order changes: the values, shapes, tied embeddings and state dict are the same, and
results agree to float32 rounding (the sums run in another order). But save_pretrained wants
contiguous tensors: `arrange_linear_weights(model, input_major=False)` first.
"""

from __future__ import annotations

import torch


def arrange_linear_weights(model: torch.nn.Module, input_major: bool = True) -> int:
    """Store every float32 CPU nn.Linear weight with out_features >= in_features input-major,
    every other one row-major (as loaded; also what a GPU gets back after .to("cuda")); with
    input_major=False, all of them row-major (to save the model). In place; shared (tied)
    weights stay shared. -> how many weights are stored input-major."""
    arranged = 0
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        weight = module.weight
        wide = module.out_features >= module.in_features
        if input_major and weight.device.type == "cpu" and weight.dtype == torch.float32 and wide:
            if not is_input_major(weight):
                weight.data = weight.data.t().contiguous().t()
            arranged += 1
        elif not weight.is_contiguous():
            weight.data = weight.data.contiguous()
    return arranged


def is_input_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight (out, in) is stored as its contiguous transpose."""
    return weight.ndim == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


def input_major_count(model: torch.nn.Module) -> int:
    """How many distinct nn.Linear weights are stored input-major."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(is_input_major(w) for w in weights.values())
