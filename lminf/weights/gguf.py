"""Running a GGUF file's own low-bit weights instead of their float32 copies.

A built-in model is a GGUF file; lminf.default_model converts it once to float32, exactly:
every weight becomes its block's value. With `weights="gguf"` each linear layer whose tensor
is in a block format below keeps the file's blocks instead, as an `Int4Linear` (4 bits read
per weight, not 32); other tensors (K-quants, float) keep their dense layer.

ggml's block formats, in groups of 32 weights along the input dimension:
    Q4_0  scale d (fp16), 32 codes q in 0..15        w = d * (q - 8)
    Q4_1  d and m (fp16), 32 codes q in 0..15        w = d * q + m = d * (q - 8) + (m + 8d)
    Q8_0  d (fp16), 32 codes q in -128..127          w = d * q, q = 16 * (q >> 4) + (q & 15): two 4-bit parts
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from lminf.weights.int4 import Int4Linear, Part

GROUP = 32
BLOCK_BYTES = {gguf.GGMLQuantizationType.Q4_0: 18, gguf.GGMLQuantizationType.Q4_1: 20, gguf.GGMLQuantizationType.Q8_0: 34}


def block_parts(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> list[Part]:
    """A tensor's raw blocks (N rows, bytes per row) as Int4Linear parts."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, BLOCK_BYTES[kind])
    scale = _fp16(blocks[..., 0:2])
    # Codes stay one byte each here (Int4Linear packs them a block of rows at a time): an output layer is large.
    if kind == gguf.GGMLQuantizationType.Q8_0:
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
        high, low = torch.from_numpy(((q >> 4) + 8).astype(np.uint8)), torch.from_numpy((q & 15).astype(np.uint8))
        return [(high, 16 * scale, torch.zeros_like(scale)), (low, scale, 8 * scale)]
    nibbles = blocks[..., -16:]  # element j in the low nibble of byte j, element 16 + j in its high nibble
    codes = torch.from_numpy(np.concatenate((nibbles & 15, nibbles >> 4), -1).reshape(rows, -1))
    if kind == gguf.GGMLQuantizationType.Q4_0:
        return [(codes, scale, torch.zeros_like(scale))]
    return [(codes, scale, _fp16(blocks[..., 2:4]) + 8 * scale)]  # Q4_1


def _fp16(raw: np.ndarray) -> torch.Tensor:
    """(rows, blocks, 2) bytes holding one fp16 each -> (rows, blocks) float32"""
    return torch.from_numpy(raw.copy().view(np.float16)[..., 0].astype(np.float32))


def use_gguf_weights(model: PreTrainedModel, path: str | Path) -> int:
    """Replace every linear layer of `model` (loaded from the GGUF file at `path`) whose tensor
    is in a block format lminf runs by an Int4Linear of the file's blocks, in place; the number replaced."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    # transformers reorders some rows when it converts (Llama's q and k): the same reordering, read off its own processor.
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        tensor = tensors.get(f"{names.get_name(name)}.weight")
        if tensor is None and module.weight is model.get_input_embeddings().weight:  # tied output layer
            tensor = tensors.get(f"{names.get_name('model.embed_tokens')}.weight")
        if tensor is None or tensor.tensor_type not in BLOCK_BYTES:
            continue
        data = np.asarray(tensor.data)
        if (data.shape[0], data.shape[1] // BLOCK_BYTES[tensor.tensor_type] * GROUP) != tuple(module.weight.shape):
            raise ValueError(f"{tensor.name} in {path} does not match {name}'s weight {tuple(module.weight.shape)}.")
        order = _row_order(processor, tensor.name, data.shape[0])
        parts = [(codes[order], scale[order], zero[order]) for codes, scale, zero in block_parts(data, tensor.tensor_type)]
        bias = None if module.bias is None else module.bias.detach().float()
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, Int4Linear(parts, GROUP, bias))
        replaced += 1
    if not replaced:
        raise ValueError(f"{path} has no weights in a block format lminf runs ({', '.join(k.name for k in BLOCK_BYTES)}).")
    return replaced


def _row_order(processor: TensorProcessor, name: str, rows: int) -> torch.Tensor:
    """The row of the file's tensor that each row of transformers' weight comes from."""
    order = processor.process(weights=np.arange(rows)[:, None], name=name).weights[:, 0]
    if sorted(order.tolist()) != list(range(rows)):
        raise ValueError(f"transformers changes {name} beyond reordering its rows; lminf cannot keep its blocks.")
    return torch.from_numpy(np.ascontiguousarray(order))
