"""The embedded default model: a small MoE trained on Shakespeare, shipped as a HF checkpoint and
converted to a sliced GGUF on first use (cached by content, so a changed checkpoint or converter
gives a new file and an unchanged one is converted once).

Provenance (corpus, split, steps, loss, held-out perplexity) is in the checkpoint's
`provenance.json`; `scripts/train_tiny_moe.py` reproduces it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import __version__

EMBEDDED_CHECKPOINT = Path(__file__).with_name("models") / "tiny-shakespeare-moe"
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where converted models and downloaded corpora are kept: $SLICEMOE_CACHE_DIR, else
    $XDG_CACHE_HOME/slicemoe-gguf, else ~/.cache/slicemoe-gguf (the native build uses the same)."""
    if os.environ.get("SLICEMOE_CACHE_DIR"):
        return Path(os.environ["SLICEMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slicemoe-gguf"


def _checkpoint_digest(checkpoint: Path) -> str:
    from slicemoe_convert.converter import FILE_REVISION

    digest = hashlib.sha256(f"{__version__}/{FILE_REVISION}".encode())
    for name in _CHECKPOINT_FILES:
        digest.update(name.encode())
        digest.update((checkpoint / name).read_bytes())
    return digest.hexdigest()[:16]


def embedded_gguf(*, experts: str = "amat", progress: bool = True) -> Path:
    """Path of the embedded model converted with `--experts experts`, converting it if needed."""
    from slicemoe_convert.converter import Converter

    missing = [name for name in _CHECKPOINT_FILES if not (EMBEDDED_CHECKPOINT / name).exists()]
    if missing:
        raise FileNotFoundError(f"the embedded checkpoint in {EMBEDDED_CHECKPOINT} lacks {', '.join(missing)}; "
                                f"reinstall slicemoe-gguf or run scripts/train_tiny_moe.py")
    path = cache_dir() / "models" / f"{EMBEDDED_CHECKPOINT.name}-{experts}-{_checkpoint_digest(EMBEDDED_CHECKPOINT)}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # The converter writes to a temporary file and renames it: a run interrupted here leaves
        # no half-written GGUF under the cached name.
        Converter(EMBEDDED_CHECKPOINT, experts=experts).write(path, force=True, progress=progress)
    return path
