"""Run the SirLLM authors' code on the default model over a scripted dialogue (in its own venv: transformers 4.33).

Their pos-shift attention (keys cached before rotation, window positions), their cache
(StartRecentKVCache.evict_for_space_token_entropy) and their score (Evaluator._cal_selfinfo), driven turn by
turn as their evaluation loop drives them: before a turn, evict to make room for it and multiply the kept scores
by the decay; then one forward over the turn, whose logits give its tokens' scores. Their attention repeats the
key/value heads itself (repeat_kv), so the model is loaded as it is. Records each turn's logits, the dialogue
positions the cache keeps after each eviction, and the scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def checkout_commit(folder: Path) -> str:
    """The commit of a git checkout, or "unknown" for an exported tree."""
    run = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def load_model(folder: Path) -> LlamaForCausalLM:
    config = json.loads((folder / "config.json").read_text())
    their_config = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], hidden_act=config["hidden_act"],
        max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config.get("rope_parameters", config)["rope_theta"], tie_word_embeddings=config["tie_word_embeddings"],
        pad_token_id=config["pad_token_id"], bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
    )
    model = LlamaForCausalLM(their_config)
    state = load_file(folder / "model.safetensors")
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied embeddings
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sirllm", type=Path, required=True, help="a checkout of Zoeyyao27/SirLLM")
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--token-entropy-size", type=int, default=60)
    parser.add_argument("--recent-size", type=int, default=30)
    parser.add_argument("--decay-ratio", type=float, default=0.9)
    args = parser.parse_args()

    sys.path.insert(0, str(args.sirllm))
    from sir_llm.enable_streaming_llm import enable_streaming_llm
    from sir_llm.eval_utils import Evaluator

    inputs = json.loads(args.inputs.read_text())
    model = load_model(Path(inputs["model_folder"]))
    kv_cache = enable_streaming_llm(model, args.start_size, args.recent_size, args.token_entropy_size)

    past_key_values, token_entropy = None, None
    positions = torch.zeros(1, 1, 0, 1)  # the dialogue position of each cache slot, evicted alongside the layers
    turns, seen, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for turn_ids in inputs["sirllm"]["turn_ids"]:
            record = {"input_ids": turn_ids, "cache_before": positions.shape[2]}
            if token_entropy is not None:  # as their loop: evict for the coming turn, then decay the kept scores
                evicted = kv_cache.evict_for_space_token_entropy([*past_key_values, [positions, positions]],
                                                                 token_entropy, len(turn_ids))
                *past_key_values, (positions, _) = evicted[0]
                token_entropy = (np.array(evicted[1]) * args.decay_ratio).tolist()
            record["kept_positions"] = positions.flatten().long().tolist()
            record["scores_before"] = token_entropy
            out = model(input_ids=torch.tensor([turn_ids]), past_key_values=past_key_values, use_cache=True)
            past_key_values = out.past_key_values
            turn_scores = Evaluator._cal_selfinfo(None, turn_ids, out.logits)
            token_entropy = turn_scores if not token_entropy else token_entropy + turn_scores
            record.update(first_position=seen, logits=out.logits[0].clone(), turn_scores=turn_scores)
            new_positions = torch.arange(seen, seen + len(turn_ids)).view(1, 1, -1, 1).float()
            positions, seen = torch.cat([positions, new_positions], dim=2), seen + len(turn_ids)
            turns.append(record)

    result = {
        "settings": {"start_size": args.start_size, "token_entropy_size": args.token_entropy_size,
                     "recent_size": args.recent_size, "decay_ratio": args.decay_ratio},
        "commit": checkout_commit(args.sirllm), "transformers": transformers.__version__, "torch": torch.__version__,
        "turns": turns,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    evictions = sum(len(t["kept_positions"]) < t["cache_before"] for t in turns)
    print(f"SirLLM: {len(turns)} turns, {evictions} evictions, cache {kv_cache.cache_size}, "
          f"{result['seconds']:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
