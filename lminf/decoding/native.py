"""lminf's own C++ kernels on a CPU, built on first use: one query's attention (one_query_cpu.cpp)
and a decoding step's layers around it (decode_layer_cpu.cpp: `layers()`, lminf.decoding).

Why: a decoding step's attention reads each stored key and value once and does little
arithmetic on them, and torch's fused CPU kernel neither reads them at the memory's speed on
one query nor keeps the float32 query over a 16-bit cache (it rounds the query to the cache's
dtype). This one scores four keys at a time and sums in float32
(docs/history.md, native-kernel-v2-ab).

Built with `compiler()` ($CXX, else g++; the tests ask `has_compiler()` the same) into lminf's
cache folder (kernels/ under ~/.cache/lminf or $LMINF_CACHE), against this torch, for this
CPU's vector instructions; about 15 s, once per torch version and CPU. Where it cannot be
built, `op()` is None (said once) and callers run torch's kernels. LMINF_NATIVE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("one_query_cpu.cpp", "decode_layer_cpu.cpp"))
# at::vec's instruction sets, as torch names them, and the flags that select them
_ISA_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}  # fmt: skip
_state: dict = {}  # "op": the loaded op or None, "why": why not


def op():
    """torch.ops.lminf.one_query (rows (Hkv, rep, D) float32, keys, values (Hkv, S, D), scale,
    far_cos=None, far_sin=None (n_far, D): the first n_far keys turned by them first)
    -> (Hkv, rep, D) float32; None where it cannot be built or LMINF_NATIVE=0."""
    if "op" not in _state:
        _state["op"] = _load()
    return _state["op"]


def layers():
    """torch.ops.lminf, whose `enter` and `leave` run a Llama-shaped layer with float32 or 4-bit
    weights around its attention and `layers` every layer of a decoding step with its attention and
    cache writes (decode_layer_cpu.cpp); None where `op()` is (one library holds both)."""
    return None if op() is None else torch.ops.lminf


def compiler() -> str:
    """The C++ compiler the kernels are built with: $CXX, else g++ (it needs OpenMP's -fopenmp)."""
    return os.environ.get("CXX") or "g++"


def has_compiler() -> bool:
    """Whether `compiler()` is installed: where it is, the kernels must build."""
    return shutil.which(compiler()) is not None


def why_not() -> str | None:
    """Why `op()` is None; None when it is not."""
    op()
    return _state.get("why")


def _load():
    if os.environ.get("LMINF_NATIVE", "1") == "0":
        _state["why"] = "LMINF_NATIVE=0"
        return None
    if hasattr(torch.ops.lminf, "one_query"):  # loaded already (another copy of this module)
        return torch.ops.lminf.one_query
    try:
        library = _built()
        torch.ops.load_library(str(library))
    except Exception as error:  # a missing compiler or headers: torch's kernels run instead
        _state["why"] = f"{type(error).__name__}: {str(error)[-500:]}"
        said = f"lminf's C++ attention kernel is not available here ({_state['why']}); decoding uses torch's kernels"
        warnings.warn(f"{said} (LMINF_NATIVE=0 says nothing).", stacklevel=3)
        return None
    torch.library.register_fake("lminf::one_query")(_shape)
    return torch.ops.lminf.one_query


def _shape(rows, keys, values, scale, far_cos=None, far_sin=None):
    """What the op returns, for tracing (torch.compile, torch.export)."""
    return rows.new_empty(rows.shape, dtype=torch.float32)


def _command(sources: tuple[Path, ...], library: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    includes = [flag for path in cpp_extension.include_paths() for flag in ("-I", path)]
    return [
        compiler(), "-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp", *isa, *includes,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *map(str, sources), "-o", str(library),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip


def _built() -> Path:
    """The library for this source, torch and CPU: from the cache, else compiled into it."""
    command = " ".join(_command(SOURCES, Path("x")))
    sources = [source.read_text() for source in SOURCES]
    key = "\n".join([*sources, torch.__version__, torch.backends.cpu.get_cpu_capability(), command])
    root = os.environ.get("LMINF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lminf"
    cache = Path(root) / "kernels"  # under lminf.default_model.cache_root (not imported: kernels import no model code)
    library = cache / f"lminf-kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    print(f"lminf: building its C++ kernels into {cache} (once for this torch and CPU, about 15 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache) as work:  # built aside, then moved: two processes may build at once
        built = Path(work) / library.name
        done = subprocess.run(_command(SOURCES, built), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {' and '.join(s.name for s in SOURCES)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library
