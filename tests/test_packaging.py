"""`pip install lminf` is enough for `patch` and `generate`; serving and evaluation say which extra they need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lminf.eval.ruler import Sources

EXTRAS_MODULES = ("fastapi", "uvicorn", "starlette", "matplotlib", "wonderwords", "rdata")

# The extras unimportable (None in sys.modules), as after a plain `pip install lminf`; each command
# fails fast (a bad flag) past the point where it checks its extra, so a missing check fails fast too.
WITHOUT_EXTRAS = f"""
import contextlib, io, json, sys
for name in {EXTRAS_MODULES!r}:
    sys.modules[name] = None
import torch, transformers
import lminf
from lminf.cli import main

config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, eos_token_id=63)
model = lminf.patch(transformers.AutoModelForCausalLM.from_config(config).eval(), n_global=2, n_local=8)
ids = torch.arange(1, 41)[None]
generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape[1]

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit:
            code = exit.code
        except Exception as error:  # a failure the CLI does not handle: its name is the test's message
            code = repr(error)
    return {{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}}

print(json.dumps({{"generated": generated, "help": run("generate", "--help"), "serve": run("serve"),
                  "eval": run("eval", "ppl", "--tokens", "1"),
                  "bench": run("bench", "--lengths", "0")}}))
"""


@pytest.fixture(scope="module")
def without_extras() -> dict:
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_patch_and_generate_run_without_the_extras(without_extras):
    assert without_extras["generated"] == 43  # 40 prompt tokens, 3 new
    assert without_extras["help"]["code"] == 0 and "usage: lminf generate" in without_extras["help"]["stdout"]


def test_serve_without_its_extra_says_what_to_install(without_extras):
    serve = without_extras["serve"]
    assert serve["code"] == 2
    assert "lminf serve needs FastAPI and uvicorn: pip install 'lminf[serve]'" in serve["stderr"]
    assert "Traceback" not in serve["stderr"]


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_evaluations_without_their_extra_say_what_to_install(without_extras, command):
    run = without_extras[command]
    assert run["code"] == 2 and "matplotlib: pip install 'lminf[eval]'" in run["stderr"]


def test_ruler_without_wonderwords_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wonderwords", None)
    with pytest.raises(ImportError, match=r"wonderwords .*pip install 'lminf\[eval\]'"):
        Sources.load("a book of words", "a document")
