"""Shared fixtures: tiny transformers checkpoints and their GGUF conversions, made once per session.

The tests run against the installed package (pytest's importlib mode keeps the source tree off
sys.path), so they exercise the real native library the build produced.
"""

from __future__ import annotations

from pathlib import Path

import os

import pytest
from hypothesis import settings

# CI replays the same examples every run (a red build must be reproducible); locally hypothesis
# keeps searching with new random examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

from helpers import convert, convert_with_pinned_llama_cpp, make_tiny_moe


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(arch, layout) -> directory of a tiny random checkpoint shaped as the published one, written
    by transformers (layout "save_pretrained", the default, or "state_dict"); made on first use."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, layout: str = "save_pretrained") -> Path:
        if (arch, layout) not in made:
            made[arch, layout] = make_tiny_moe(arch, root / f"{arch}-{layout}", layout=layout)
        return made[arch, layout]

    return get


@pytest.fixture(scope="session")
def sliced_gguf(tiny_checkpoints, tmp_path_factory):
    """arch -> AMAT GGUF of the arch's fixture with slicemoe-convert's defaults (made once)."""
    root = tmp_path_factory.mktemp("sliced")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            out = root / f"{arch}.gguf"
            proc = convert(tiny_checkpoints(arch), out)
            assert proc.returncode == 0, proc.stderr
            made[arch] = out
        return made[arch]

    return get


@pytest.fixture(scope="session")
def stock_gguf(tiny_checkpoints, tmp_path_factory):
    """arch -> F32 GGUF of the tiny checkpoint, written by the pinned llama.cpp converter."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = convert_with_pinned_llama_cpp(tiny_checkpoints(arch), root / f"{arch}-f32.gguf")
        return made[arch]

    return get
