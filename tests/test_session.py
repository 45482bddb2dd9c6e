"""Sessions that keep their cache between turns, the pinned (global) prefix, and the chat turn
shared by `lminf chat` and the server."""

from __future__ import annotations

import functools
import io
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lminf
import lminf.default_model
from lminf.cli import main
from lminf.serve.session import ReplyText, Sampling, Session, SessionStore, Turn, stream_tokens
from tests.helpers import tiny_model

torch.set_grad_enabled(False)


def test_per_call_n_global_equals_patching_with_it():
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    wide = lminf.patch(tiny_model(), n_global=9, n_local=8)(ids).logits
    model = lminf.patch(tiny_model(), n_global=2, n_local=8)
    torch.testing.assert_close(model(ids, lminf_n_global=9).logits, wide, rtol=1e-4, atol=1e-4)


def test_session_turns_equal_one_pass_and_keep_the_pinned_prefix():
    model = lminf.patch(tiny_model(), n_global=2, n_local=8)
    session = Session(model, n_global=6)  # e.g. a 6-token system prompt
    turns = [list(range(10, 25)), list(range(30, 37)), list(range(40, 52))]
    replies = []
    for turn in turns:
        replies.append(
            [t for t in stream_tokens(model, session, turn, Sampling(max_new_tokens=5), stop_ids=set()) if t is not None]
        )
    # The same tokens in one pass give the same greedy choices.
    history = torch.tensor([session.tokens[:-1]])
    greedy = model(history, lminf_n_global=6, use_cache=False).logits[0].argmax(-1)
    position = 0
    for turn, reply in zip(turns, replies, strict=True):
        position += len(turn)
        assert reply == greedy[position - 1 : position - 1 + len(reply)].tolist()
        position += len(reply)
    layer = session.cache.layers[0]
    assert layer.keys.shape[-2] <= 6 + 8  # pinned prefix + window, after 54 tokens
    fresh = Session(model, n_global=6)
    list(stream_tokens(model, fresh, turns[0][:6], Sampling(max_new_tokens=1), stop_ids=set()))
    torch.testing.assert_close(layer.keys[:, :, :6], fresh.cache.layers[0].keys[:, :, :6])  # still the first 6 tokens


def test_store_reuses_longest_text_prefix_and_evicts_least_recent():
    model = lminf.patch(tiny_model(), n_local=8)
    store = SessionStore(model, capacity=2)
    sessions = []
    for text in ["abc", "abcdef", "xyz"]:
        session = store.checkout(text, n_global=10)
        assert session.text == ""  # nothing to reuse yet: each starts afresh
        session.text = text
        sessions.append(session)
    for s in sessions:
        store.checkin(s)
    assert len(store) == 2  # "abc" evicted
    reused = store.checkout("abcdefgh", n_global=10)
    assert reused is sessions[1] and "abcdefgh"[len(reused.text) :] == "gh"
    with pytest.raises(ValueError, match="does not extend"):
        reused.take_text("abX", tokenizer=None)
    fresh = store.checkout("abc!", n_global=10)
    assert fresh not in sessions and fresh.text == ""


@pytest.mark.slow
@pytest.mark.model
def test_chat_cli_replies_each_turn_and_reset_starts_over(monkeypatch, capsys):
    def chat(script: str) -> tuple[list[str], str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        assert main(["chat", "--system", "Be brief.", "--max-new-tokens", "8", "--n-local", "64"]) == 0
        out = capsys.readouterr()
        # stdout: a "> " prompt per line read, each reply followed by a newline
        chunks = out.out.removeprefix("> ").removesuffix("\n> ").split("\n> ")
        return [re.sub(r"^(> )+", "", chunk) for chunk in chunks], out.err

    replies, log = chat("Hello!\nWhat did I just say?\n/stats\n/reset\nHi again.\n/quit\n")
    assert len(replies) == 3 and all(r.strip() for r in replies)
    tokens_so_far = int(re.search(r"tokens so far (\d+)", log).group(1))
    assert tokens_so_far > 10 and "conversation reset" in log  # two turns with the system prompt
    fresh, _ = chat("Hi again.\n/quit\n")
    assert fresh == [replies[2]]  # greedy: after /reset the reply is a new chat's


def _turn_model():
    """A tiny random model over the default tokenizer's vocabulary, so replies decode to text."""
    return lminf.patch(tiny_model(vocab_size=len(_tokenizer())), n_global=2, n_local=16)


def _reply(model, prompt, max_new_tokens=12, stops=(), stop_ids=frozenset()):
    session = Session(model, n_global=4)
    turn = Turn(model, _tokenizer(), session, prompt, Sampling(max_new_tokens), set(stop_ids), stops)
    pieces = list(turn.steps())
    assert "".join(pieces) == turn.text  # what was streamed is the reply
    return turn, session


@pytest.mark.model  # the default model's tokenizer
def test_turn_streams_the_reply_records_it_and_the_next_turn_reuses_it():
    model, tokenizer = _turn_model(), _tokenizer()
    prompt = "Hello there, how are you today?"
    turn, session = _reply(model, prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert turn.finish_reason == "length" and turn.completion_tokens == 12
    assert (turn.cached_tokens, turn.prompt_tokens) == (0, len(prompt_ids))
    assert turn.text == tokenizer.decode(turn.reply.tokens, skip_special_tokens=True)
    assert session.tokens == prompt_ids + turn.reply.tokens
    assert session.text == prompt + tokenizer.decode(turn.reply.tokens)  # special tokens too
    follow_up = Turn(model, tokenizer, session, session.text + " And then?", Sampling(4), set())
    list(follow_up.steps())
    assert follow_up.cached_tokens == turn.prompt_tokens + turn.completion_tokens
    new_ids = tokenizer(" And then?", add_special_tokens=False)["input_ids"]
    assert follow_up.prompt_tokens - follow_up.cached_tokens == len(new_ids)


@pytest.mark.model  # the default model's tokenizer
def test_turn_ends_before_a_stop_string_or_at_a_stop_token():
    model = _turn_model()
    full, _ = _reply(model, "Tell me a story.", max_new_tokens=16)
    text, tokenizer = full.text, _tokenizer()
    assert len(text) >= 8, text
    # A stop string across two tokens: the first token's last character must be held back.
    ends = [len(tokenizer.decode(full.reply.tokens[:i], skip_special_tokens=True)) for i in range(1, 16)]
    across = next(text[e - 1 : e + 1] for e in ends if 0 < e < len(text) and text[e - 1 : e + 1].strip())
    for stop in (text[3:5], text[-2:], across):
        cut, _ = _reply(model, "Tell me a story.", max_new_tokens=16, stops=["", "never there", stop])
        assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    token = full.reply.tokens[2]
    by_token, _ = _reply(model, "Tell me a story.", max_new_tokens=16, stop_ids={token})
    assert by_token.reply.tokens == full.reply.tokens[: full.reply.tokens.index(token) + 1]
    assert by_token.finish_reason == "stop"


@pytest.mark.model  # the default model's tokenizer
def test_a_turn_closed_mid_way_keeps_the_session_consistent():
    model, tokenizer = _turn_model(), _tokenizer()
    session = Session(model, n_global=4)
    turn = Turn(model, tokenizer, session, "Once upon a time", Sampling(50), set())
    steps = turn.steps()
    for _ in range(3):
        next(steps)
    steps.close()  # as the server does when a client leaves
    assert turn.completion_tokens == 3 and session.tokens[-3:] == turn.reply.tokens
    assert session.text == "Once upon a time" + tokenizer.decode(turn.reply.tokens)
    follow_up = Turn(model, tokenizer, session, session.text + ". The end", Sampling(6), set())
    list(follow_up.steps())
    # The cached turns give the greedy choices of one pass over the same tokens.
    greedy = model(torch.tensor([session.tokens[:-1]]), lminf_n_global=4, use_cache=False).logits[0].argmax(-1).tolist()
    for done in (turn, follow_up):  # a reply's tokens follow its prompt's
        reply = done.reply.tokens
        assert session.tokens[done.prompt_tokens : done.prompt_tokens + len(reply)] == reply
        assert reply == greedy[done.prompt_tokens - 1 : done.prompt_tokens - 1 + len(reply)]


@pytest.mark.model
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reply_text_adds_up_to_a_full_decode(data):
    tokenizer = _tokenizer()
    text = "Plain words, naïve café — 東京の空, emoji 🙂🙂, tabs\tand\nnew lines. " * 3
    real = tokenizer(text)["input_ids"]
    ids = data.draw(st.one_of(st.just(real), st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40)))
    reply = ReplyText(tokenizer)
    pieces = "".join(reply.add(t) for t in ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert pieces == reply.text and full.startswith(pieces)
    if not full.endswith("\ufffd"):
        assert pieces == full


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lminf.default_model.converted_folder())
