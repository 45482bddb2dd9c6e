"""The inputs of the authors'-code check, tokenized by lminf's tokenizer (run in lminf's venv).

Writes one JSON: the LongHeads prompt (the start of a long public-domain text, past the training length)
and the SirLLM dialogue (one list of token ids per turn, formatted as the SirLLM evaluation formats a turn).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from lminf.default_model import model_source
from lminf.eval.data import find_document

# A grocery-memory episode in the style of SirLLM's evaluation: a key turn, distractors, a recall question.
DIALOGUE = [
    ("I want you to buy the grocery: apricots. Please remember it.", "OK, I will buy apricots."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which animal is the largest on land?", "The African elephant is the largest land animal."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("Where do penguins mostly live?", "Most penguins live in the Southern Hemisphere."),
    ("Which one is the grocery that I want you to buy earlier?", "You want me to buy apricots."),
]


def turn_text(question: str, answer: str) -> str:
    return "USER: " + question + "\n\nASSISTANT: " + answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--document", default="emma", help="a text file or an extracted source (`lminf data emma`)")
    parser.add_argument("--tokens", type=int, default=9000, help="LongHeads prompt length")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(model_source(None), local_files_only=True)
    text = find_document(args.document).read_text(encoding="utf-8")
    ids = tokenizer(text[: args.tokens * 8], add_special_tokens=False).input_ids
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.document} has only {len(ids)} tokens; need {args.tokens}.")
    turns = [tokenizer(turn_text(q, a), add_special_tokens=False).input_ids for q, a in DIALOGUE]
    inputs = {
        "model_folder": model_source(None),
        "longheads": {"document": str(args.document), "input_ids": ids[: args.tokens]},
        "sirllm": {"turn_texts": [turn_text(q, a) for q, a in DIALOGUE], "turn_ids": turns},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(inputs))
    print(f"wrote {args.out}: {args.tokens} prompt tokens, {len(turns)} turns of {[len(t) for t in turns]} tokens")


if __name__ == "__main__":
    main()
