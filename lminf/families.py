"""Which model families lminf can patch, and what each of their attention layers is.

A family is described once (`Family`, in `FAMILIES`); everything else is read from the
model's own config fields, as transformers does: `layer_types` and `sliding_window` (which
layers are sliding), `rope_parameters` (per layer type when it differs, partial rotary),
`no_rope_layers` (position-free layers). Every supported family routes attention through
transformers' attention interface (MPT through a small adapter, lminf.adapters), has at most
one rotary embedding module (its frequencies move with the model) and one attention module
per layer (with its `layer_idx`).

Each layer is one `LayerKind`, and lminf treats each kind by its own rule (lminf.patching):
- a global rotary layer runs the strategy (Lambda attention for LM-Infinite);
- a sliding layer keeps the model's own window (it is already bounded), cache of that window;
- a position-free (NoPE) global layer runs the strategy's keys without any rotation;
- an ALiBi layer (MPT) runs them with ALiBi's bias at the strategy's distances (capped for LM-Infinite).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from lminf.adapters import grow_gptj_table, mpt_attention


@dataclass(frozen=True)
class LayerKind:
    """One attention layer as the model defines it."""

    layer_type: str = "full_attention"  # transformers' name; picks the layer's rope parameters
    window: int | None = None  # the model's own sliding window (query i sees keys i - window < j <= i)
    rotary: bool = True  # False: a position-free (NoPE) layer, queries and keys are never rotated

    @property
    def is_global(self) -> bool:
        return self.window is None


@dataclass(frozen=True)
class Family:
    """What lminf must know of a family beyond transformers' config fields."""

    model_type: str
    about: str = ""  # what is particular about it, for docs/models.md
    # `sliding_window` in the config applies to every layer (Mistral's style, no `layer_types`).
    sliding_everywhere: bool = False
    # (config, layer index) -> True for a layer the model leaves without rotary positions.
    position_free: Callable[[PretrainedConfig, int], bool] | None = None
    interleaved: bool = False  # rotary pairs (2f, 2f + 1) as in GPT-J, not Llama's (f, f + rot/2)
    # For a rotary module that holds a table, not frequencies: the module -> its frequencies.
    inv_freq: Callable[[torch.nn.Module], torch.Tensor] | None = None
    # model -> a handle whose .remove() undoes it: a family's adapter, applied by `patch` (lminf.adapters).
    prepare: Callable[[PreTrainedModel], object] | None = None
    alibi: bool = False  # ALiBi biases (MPT): the cache keeps its keys in order (each key's distance counts)


def _no_rope_layers(config: PretrainedConfig, layer: int) -> bool:
    return not config.no_rope_layers[layer]  # SmolLM3: 0 marks a NoPE layer


def _every_layer(config: PretrainedConfig, layer: int) -> bool:
    return True  # ALiBi models have no rotary positions at all


def _global_when_sliding(config: PretrainedConfig, layer: int) -> bool:
    # Cohere 2 and EXAONE 4 rotate only their sliding layers; their global layers are NoPE.
    return config.sliding_window is not None and config.layer_types[layer] == "full_attention"


def _gptj_inv_freq(rotary: torch.nn.Module) -> torch.Tensor:
    return _sinusoid_inv_freq(rotary.pos_embd_dim)  # the frequencies its sinusoid table was made of


@functools.cache  # one tensor per size: every layer's call sees the same one, so per-forward tables are reused
def _sinusoid_inv_freq(dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama"),
        Family("mistral", "sliding_window (if set) on every layer", sliding_everywhere=True),
        Family("qwen2", "sliding layers if use_sliding_window"),
        Family("qwen3", "norms on q and k"),
        Family("phi3", "partial rotary; sliding_window (if set) on every layer", sliding_everywhere=True),
        Family("gemma"),
        Family("gemma2", "sliding and global layers alternate; attention logit soft-capping"),
        Family("gemma3_text", "5 sliding layers to 1 global; rope theta per layer type"),
        Family("olmo2", "norms on q and k"),
        Family("olmo3", "sliding and global layers"),
        Family("granite", "its own attention scale"),
        Family("stablelm", "a quarter of the channels rotate"),
        Family("phi", "half of the channels rotate"),
        Family("gpt_neox", "partial rotary (GPT-NeoX, Pythia)"),
        Family(
            "gptj",
            "partial rotary in interleaved pairs, a position table grown past the training length",
            interleaved=True,
            inv_freq=_gptj_inv_freq,
            prepare=grow_gptj_table,
        ),
        Family(
            "mpt",
            "ALiBi (an adapter: attention inside its module); the first tokens get the bias of distance n_local",
            position_free=_every_layer,
            prepare=mpt_attention,
            alibi=True,
        ),
        Family("starcoder2", "sliding_window (if set) on every layer", sliding_everywhere=True),
        Family("cohere2", "sliding rotary layers, global NoPE layers", position_free=_global_when_sliding),
        Family("smollm3", "every 4th layer NoPE", position_free=_no_rope_layers),
        Family("exaone4", "sliding rotary layers, global NoPE layers", position_free=_global_when_sliding),
        Family("cohere", "interleaved rotary pairs", interleaved=True),
        Family("glm", "partial rotary in interleaved pairs", interleaved=True),
        Family("glm4", "partial rotary in interleaved pairs", interleaved=True),
        Family("olmo"),
        Family("nemotron", "partial rotary"),
        Family("persimmon", "partial rotary, norms on q and k"),
        Family("arcee"),
        Family("seed_oss"),
        Family("ernie4_5", "interleaved rotary pairs", interleaved=True),
        Family("apertus"),
        Family("mixtral", "mixture of experts; sliding_window (if set) on every layer", sliding_everywhere=True),
        Family("olmoe", "mixture of experts"),
        Family("granitemoe", "mixture of experts"),
        Family("qwen2_moe", "mixture of experts"),
        Family("qwen3_moe", "mixture of experts"),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# RoPE variants whose frequencies do not change with the input length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Why some well-known families are refused, for the error message.
REFUSED = {
    "deepseek_v2": "multi-head latent attention",
    "deepseek_v3": "multi-head latent attention",
    "gpt2": "no rotary positions",
    "bloom": "ALiBi computed inside its attention module; MPT has an adapter, BLOOM not yet",
    "falcon": "attention outside transformers' attention interface",
    "gemma3": "the multimodal wrapper; its text model (Gemma3ForCausalLM, model type gemma3_text) is supported",
}


def training_length(config: PretrainedConfig) -> int:
    """The longest input the model was trained on (MPT calls it `max_seq_len`)."""
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "max_seq_len", None)
    if not length:
        raise ValueError(f"this {config.model_type} config says no training length (max_position_embeddings); give n_local.")
    return int(length)


def check_supported(model: PreTrainedModel) -> None:
    check_config(model.config)


def check_config(config: PretrainedConfig) -> None:
    """A clear error unless lminf supports this model configuration."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise ValueError(
            f"lminf does not support model type {model_type!r}{why}. Supported decoder families (rotary, NoPE "
            f"or ALiBi positions): {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Models with learned absolute positions (GPT-2, ...) cannot be patched."
        )
    for layer_type, rope in _rope_parameters(config).items():
        rope_type = rope.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            where = "" if layer_type is None else f" in its {layer_type} layers"
            raise ValueError(
                f"lminf does not support rope_type {rope_type!r}{where} (its frequencies change with input length); "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )
    unknown = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"lminf supports full and sliding attention layers; this model also has {unknown}.")


def _rope_parameters(config: PretrainedConfig) -> dict[str | None, dict]:
    """The rope parameters per layer type ({None: ...} when all layers share them)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {None: rope}


def layer_kinds(config: PretrainedConfig) -> list[LayerKind]:
    """Every attention layer of a supported model, as its config defines it."""
    check_config(config)
    family, n = FAMILIES[config.model_type], config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    default = "sliding_attention" if family.sliding_everywhere and window is not None else "full_attention"
    types = list(getattr(config, "layer_types", None) or [default] * n)
    kinds = []
    for i, layer_type in enumerate(types):
        free = family.position_free is not None and family.position_free(config, i)
        kinds.append(LayerKind(layer_type, window if layer_type == "sliding_attention" else None, not free))
    return kinds


def rotary_embedding(model: PreTrainedModel) -> torch.nn.Module:
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        raise ValueError(f"lminf expects one rotary embedding module in the model, found {len(rotaries)}.")
    return rotaries[0]


def layer_inv_freq(family: Family, rotary: torch.nn.Module, kind: LayerKind) -> torch.Tensor | None:
    """The rotary frequencies a layer of this kind uses (a buffer of the model's rotary module,
    per layer type where the family has several, e.g. Gemma 3); None for a NoPE layer."""
    if not kind.rotary:
        return None
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq
    if hasattr(rotary, f"{kind.layer_type}_inv_freq"):
        return getattr(rotary, f"{kind.layer_type}_inv_freq")
    if family.inv_freq is None:
        raise ValueError(f"lminf cannot find the rotary frequencies of {type(rotary).__name__}.")
    return family.inv_freq(rotary)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if len(modules) != model.config.num_hidden_layers:
        raise ValueError(
            f"lminf found {len(modules)} attention layers, expected {model.config.num_hidden_layers}; "
            "this model's layout is not supported."
        )
    return modules


def rotary_inv_freq(config: PretrainedConfig) -> torch.Tensor:
    """The rotary frequencies of a model of this configuration whose layers are all global and
    rotary, computed by its own transformers rotary class (for engines that build the model
    themselves, e.g. vLLM)."""
    kinds = layer_kinds(config)
    if FAMILIES[config.model_type].interleaved:
        raise ValueError(f"lminf in vLLM supports Llama's rotary pairing; {config.model_type} rotates interleaved pairs.")
    if not all(k.is_global and k.rotary for k in kinds):
        raise ValueError(
            f"this {config.model_type} model has sliding or position-free layers; lminf runs those through "
            "transformers (lminf.patch), not yet inside vLLM."
        )
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    return rotary(config).inv_freq


def models_markdown() -> str:
    """docs/models.md, written from FAMILIES (`python -m lminf.families > docs/models.md`)."""
    rows = "\n".join(f"| `{f.model_type}` | {f.about or 'plain rotary'} |" for f in FAMILIES.values())
    refused = "\n".join(f"- `{model_type}`: {why}" for model_type, why in REFUSED.items())
    return (
        "<!-- generated by `python -m lminf.families > docs/models.md`; do not edit by hand -->\n"
        "# Supported models\n\n"
        "A family is one `Family` entry in `lminf/families.py`; everything else is read from the model's own\n"
        "config fields (`layer_types`, `sliding_window`, `rope_parameters`, `no_rope_layers`). Each family has a\n"
        "tiny random-weight model in the conformance suite (`tests/conftest.py`). How each kind of layer is\n"
        "treated (global, sliding, position-free, ALiBi): [architecture.md](architecture.md#layer-kinds).\n\n"
        f"| family (`model_type`) | what is particular |\n|---|---|\n{rows}\n\n"
        f"RoPE scaling types: {', '.join(f'`{t}`' for t in SUPPORTED_ROPE_TYPES)} (per layer type where the model has "
        "several).\n\nRefused with a clear error:\n\n"
        f"{refused}\n- models with learned absolute positions, rope types whose frequencies change with the length, "
        "layer types other than full and sliding attention.\n"
    )


if __name__ == "__main__":
    print(models_markdown(), end="")
