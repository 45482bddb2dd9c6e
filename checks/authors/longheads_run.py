"""Run the LongHeads authors' code on the default model (in its own venv: transformers 4.34, the flash-attn shim).

Their LlamaAttention knows no grouped-query attention, so the model is loaded as its multi-head copy (each
key/value head repeated for its query heads: the same function). Their rotary embedding has no rope_theta
setting (base 10,000); each layer's is replaced by their own class with the model's base, the one change.
Records the final-norm hidden states of every prompt position (logits = hidden @ embedding^T; the full
prefill logits would be N x 49,152 floats), the greedy tokens, and the logits of each step of their decode branch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file


def checkout_commit(folder: Path) -> str:
    """The commit of a git checkout, or "unknown" for an exported tree."""
    run = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def multi_head_state_dict(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The model's weights with each key/value head repeated for its group of query heads (as repeat_kv does)."""
    state = load_file(folder / "model.safetensors")
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            weight = state[name]
            state[name] = weight.view(-1, head_dim, weight.shape[-1]).repeat_interleave(group, dim=0).flatten(0, 1)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied embeddings
    return state


def load_longheads(longheads: Path, folder: Path, settings: dict):
    sys.path.insert(0, str(longheads))
    from modeling_longheads.configuration_llama import LlamaConfig
    from modeling_longheads.modeling_llama import LlamaForCausalLM, LlamaRotaryEmbedding

    config = json.loads((folder / "config.json").read_text())
    rope_theta = config.get("rope_parameters", config)["rope_theta"]
    their_config = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        hidden_act=config["hidden_act"], max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"], tie_word_embeddings=config["tie_word_embeddings"],
        pad_token_id=config["pad_token_id"], bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
        **settings,
    )
    model = LlamaForCausalLM(their_config)
    missing, unexpected = model.load_state_dict(multi_head_state_dict(folder, config), strict=False)
    if unexpected or any(not name.endswith("rotary_emb.inv_freq") for name in missing):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = LlamaRotaryEmbedding(head_dim, config["max_position_embeddings"], base=rope_theta)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--longheads", type=Path, required=True, help="a checkout of LuLuLuyi/LongHeads")
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, help="use only the first TOKENS prompt tokens")
    parser.add_argument("--window-size", type=int, default=256)
    parser.add_argument("--atten-length", type=int, default=1024)
    parser.add_argument("--begin-selective-length", type=int, default=8192,
                        help="queries before it attend densely; later ones one by one (slow on a CPU)")
    parser.add_argument("--batch-encoding", action="store_true", help="their batched encoding (same result)")
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps after the prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (their per-query loop runs many small ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inputs = json.loads(args.inputs.read_text())
    settings = {
        "window_size": args.window_size, "atten_length": args.atten_length,
        "begin_selective_length": args.begin_selective_length,
        "cpu_offload": False, "batch_encoding": args.batch_encoding, "encoding_batch_size": 128,
    }
    model = load_longheads(args.longheads, Path(inputs["model_folder"]), settings)
    input_ids = torch.tensor([inputs["longheads"]["input_ids"][: args.tokens]])
    hidden = {}
    model.model.norm.register_forward_hook(lambda module, args_, output: hidden.update(last=output))

    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
        prefill_s = time.perf_counter() - start
        prefill_hidden, prefill_argmax = hidden["last"][0].clone(), out.logits[0].argmax(-1)
        tokens, step_logits = [int(prefill_argmax[-1])], []
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            step = torch.tensor([[tokens[-1]]])
            mask = torch.ones(1, input_ids.shape[1] + len(tokens), dtype=torch.long)
            out = model(step, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            step_logits.append(out.logits[0, -1].clone())
            tokens.append(int(step_logits[-1].argmax()))
        decode_s = time.perf_counter() - start

    record = {
        "input_ids": input_ids[0], "settings": settings, "commit": checkout_commit(args.longheads),
        "transformers": transformers.__version__,
        "torch": torch.__version__, "prefill_hidden": prefill_hidden, "prefill_argmax": prefill_argmax,
        "greedy_tokens": tokens, "decode_logits": torch.stack(step_logits) if step_logits else None,
        "seconds": {"prefill": prefill_s, "decode": decode_s},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, args.out)
    print(f"LongHeads: {input_ids.shape[1]} tokens, prefill {prefill_s:.1f} s, {args.new_tokens} decode steps "
          f"{decode_s:.1f} s, greedy {tokens} -> {args.out}")


if __name__ == "__main__":
    main()
