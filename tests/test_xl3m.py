"""XL3M (lminf.procedures.xl3m) against the paper's description: overlapping segments in order,
each scored with the question by the entropy of the plain model's predictions, the most certain
spliced in order without repeats within the window, then the question; a planted passkey's
segment is the one chosen."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

import lminf
from lminf.cli import main
from lminf.eval import cli as eval_cli
from lminf.eval.methods import SegmentWise, method_names, methods_from
from lminf.eval.retrieval import Passkey, build_prompt
from lminf.procedures import xl3m
from lminf.procedures.xl3m import XL3M, choose, entropy, score, splice, spliced_length, split
from tests.helpers import tiny_model


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.parametrize("length,segment,overlap", [(1000, 128, 16), (129, 128, 0), (500, 100, 99), (50, 128, 16), (640, 128, 0)])
def test_split_covers_every_token_in_order_with_the_overlap(length, segment, overlap):
    spans = split(length, segment, overlap)
    covered = [t for a, b in spans for t in range(a, b)]
    assert set(covered) == set(range(length))
    assert all(b - a == min(segment, length) for a, b in spans)  # full segments, so a batch stacks
    starts = [a for a, _ in spans]
    assert starts == sorted(set(starts))  # in order, none twice
    shared = [spans[i][1] - spans[i + 1][0] for i in range(len(spans) - 1)]
    assert all(s == overlap for s in shared[:-1]) and all(s >= overlap for s in shared[-1:])


def test_splice_keeps_order_and_each_token_once_and_choose_fits_the_budget():
    context = torch.arange(1000)[None] + 7  # distinct tokens, so order and repeats show
    spans = split(1000, 128, 32)
    chosen = [1, 2, 5]  # 1 and 2 overlap by 32 tokens
    spliced = splice(context, spans, chosen)[0].tolist()
    expected = sorted({t + 7 for i in chosen for t in range(*spans[i])})
    assert spliced == expected and len(spliced) == 128 * 3 - 32 == spliced_length(spans, chosen)

    entropies = [5.0] * len(spans)
    entropies[6], entropies[5], entropies[0] = 1.0, 2.0, 3.0  # the certain ones, best first: 6, 5, 0
    assert choose(spans, entropies, budget=3 * 128 - 32) == [0, 5, 6]  # 5 and 6 share 32 tokens: 0 still fits
    assert choose(spans, entropies, budget=2 * 128) == [5, 6]  # then 0 does not
    assert choose(spans, entropies, budget=10_000, max_segments=2) == [5, 6]
    for budget in (128, 200, 300, 500, 777):
        kept = choose(spans, [random.Random(budget).random() for _ in spans], budget)
        assert kept == sorted(kept) and spliced_length(spans, kept) <= budget


def test_entropy_is_the_float64_definition():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) * 4
    p = logits.double().exp() / logits.double().exp().sum(-1, keepdim=True)
    torch.testing.assert_close(entropy(logits), -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)


def reference_scores(model, context, question, spans) -> list[float]:
    """Each [segment | question] alone through the model; float64 entropy at the question's positions."""
    out = []
    for a, b in spans:
        with torch.no_grad():
            logits = model(torch.cat([context[:, a:b], question], dim=1)).logits[0, -question.shape[1] :].double()
        p = logits.exp() / logits.exp().sum(-1, keepdim=True)
        out.append(float(-(p * p.log()).sum(-1).mean()))
    return out


def test_scores_are_the_question_entropies_of_each_sub_context():
    model = tiny_model()
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(1))
    context, question = ids[:, :-6], ids[:, -6:]
    spans = split(context.shape[1], 24, 4)
    got = score(model, context, question, spans, batch_size=3, progress=False)  # batched
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(reference_scores(model, context, question, spans)), rtol=1e-5, atol=1e-6
    )


def test_the_question_is_the_last_tokens_or_the_one_given_and_the_key_context_fits():
    model = tiny_model()  # training length 64
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    procedure = XL3M(segment_tokens=16, overlap=4, question_tokens=5)
    selection = procedure.select(model, ids, max_new_tokens=3, progress=False)
    key = selection.key_ids
    assert torch.equal(key[:, -5:], ids[:, -5:])  # the question: the input's last tokens
    assert selection.spans[-1][1] == 295 and key.shape[1] + 3 <= 64  # the context is the rest; all fits the window
    expected = reference_scores(model, ids[:, :-5], ids[:, -5:], selection.spans)
    torch.testing.assert_close(torch.tensor(selection.entropies), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    ranked = sorted(range(len(expected)), key=lambda i: expected[i])
    assert ranked[0] in selection.chosen  # the most certain segment is kept

    question = torch.tensor([[9, 8, 7, 6]])
    given = procedure.select(model, ids, max_new_tokens=3, question_ids=question, progress=False)
    assert torch.equal(given.key_ids[:, -4:], question) and given.spans[-1][1] == 300  # all of ids is context
    expected = reference_scores(model, ids, question, given.spans)
    torch.testing.assert_close(torch.tensor(given.entropies), torch.tensor(expected), rtol=1e-5, atol=1e-6)

    tokens, _ = procedure.generate(model, ids, 3, progress=False)
    assert len(tokens) == 3


def test_a_short_input_is_answered_whole_and_a_patched_model_is_refused():
    model = tiny_model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    selection = XL3M(segment_tokens=16, question_tokens=5).select(model, ids, 3, progress=False)
    assert selection.entropies is None and torch.equal(selection.key_ids, ids)
    lminf.patch(model, n_global=2, n_local=16)
    with pytest.raises(ValueError, match="plain model"):
        XL3M().select(model, ids, 3)


def test_eval_offers_xl3m_where_prompts_are_completed_and_refuses_it_for_nll():
    assert "xl3m" in eval_cli.choices("passkey") and "xl3m" in eval_cli.choices("ruler")
    assert "xl3m" not in method_names() and "xl3m" not in parse("eval", "passkey").methods.split(",")
    args = parse("eval", "needle", "--methods", "xl3m", "--segment-tokens", "64", "--question-tokens", "12")
    (method,) = methods_from(args.methods, args, eval_cli.choices("needle"))
    assert method.procedure == XL3M(segment_tokens=64, question_tokens=12, window=1024)  # window: --n-local
    for command, args in (
        ("ppl", parse("eval", "ppl", "--methods", "xl3m")),
        ("stream", parse("eval", "stream", "--methods", "xl3m")),
        ("bench", parse("bench", "--methods", "xl3m")),
    ):
        with pytest.raises(ValueError, match="no per-token NLL"):
            methods_from(args.methods, args, eval_cli.choices(command))
    with pytest.raises(NotImplementedError, match="no per-token NLL"):
        SegmentWise().nll(tiny_model(), torch.ones(1, 4, dtype=torch.long))


def planted(tokenizer, length: int, depth: float):
    ids, answer = build_prompt(Passkey(), tokenizer, length, depth, random.Random(f"xl3m/{length}/{depth}"))
    key = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"][-len(answer) :]  # its digits
    seq = ids[0].tolist()
    at = next(i for i in range(len(seq)) if seq[i : i + len(key)] == key)
    return ids, answer, at


@pytest.mark.model
@pytest.mark.parametrize("depth", [0.15, 0.6])
def test_the_planted_passkeys_segment_is_the_most_certain_and_is_chosen(default_tokenizer, depth):
    model, tokenizer = lminf.load_default()
    ids, answer, at = planted(tokenizer, 1536, depth)
    tokens, selection = XL3M(window=512, segment_tokens=128).generate(model, ids, 8, progress=False)
    needle = [i for i, (a, b) in enumerate(selection.spans) if a <= at and at + len(answer) <= b]
    best = min(range(len(selection.spans)), key=lambda i: selection.entropies[i])
    assert best in needle and best in selection.chosen
    assert len(selection.chosen) < len(selection.spans)  # it did choose
    assert tokenizer.decode(tokens).strip().startswith(answer)


@pytest.mark.model
def test_generate_procedure_xl3m_uses_the_given_question(tmp_path, monkeypatch, capsys, default_tokenizer):
    question = "What is the pass key? The pass key is"
    ids, answer, _ = planted(default_tokenizer, 1536, 0.4)
    asked = default_tokenizer(" " + question, add_special_tokens=False)["input_ids"]
    assert ids[0, -len(asked) :].tolist() == asked  # the passkey prompt ends with this question
    doc = tmp_path / "doc.txt"
    doc.write_text(default_tokenizer.decode(ids[0, : -len(asked)]))
    seen = []
    generate = XL3M.generate

    def spy(self, model, ids, *args, **kwargs):
        seen.append((self, ids, generate(self, model, ids, *args, **kwargs)))
        return seen[-1][-1]

    monkeypatch.setattr(xl3m.XL3M, "generate", spy)
    flags = ["--procedure", "xl3m", "--question", question, "--n-local", "512", "--segment-tokens", "128", "--weights", "dense"]
    assert main(["generate", str(doc), "--max-new-tokens", "8", *flags]) == 0
    out = capsys.readouterr()
    ((procedure, prompt, (tokens, selection)),) = seen
    assert out.out.strip() == default_tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert out.err.strip().splitlines()[-1].startswith(f"[lminf] xl3m: prompt {prompt.shape[1]} tokens")
    tail = default_tokenizer.decode(prompt[0, -procedure.question_tokens :])
    assert tail.lstrip().startswith(question) and tail.endswith("assistant\n")  # the question, then the template's end
    assert torch.equal(selection.key_ids[:, -procedure.question_tokens :], prompt[:, -procedure.question_tokens :])
    digits = default_tokenizer(f" {answer}", add_special_tokens=False)["input_ids"][-len(answer) :]
    seq = prompt[0].tolist()
    at = next(i for i in range(len(seq)) if seq[i : i + len(digits)] == digits)
    assert any(a <= at and at + len(digits) <= b for a, b in (selection.spans[i] for i in selection.chosen))


def test_generate_refuses_a_question_without_xl3m_and_sampling_with_it(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text. " * 10)
    assert main(["generate", str(doc), "--question", "Why?"]) == 2
    assert "--question is for --procedure xl3m" in capsys.readouterr().err
    assert main(["generate", str(doc), "--procedure", "xl3m", "--sample"]) == 2
    assert "greedily" in capsys.readouterr().err
