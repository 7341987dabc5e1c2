"""cffi (ABI mode) binding of native/include/slicemoe.h and the library that carries it.

The declarations are read from the installed header itself (between its ``cdef-begin`` and
``cdef-end`` markers), so the binding cannot drift from the C API.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import cffi

PACKAGE_DIR = Path(__file__).resolve().parent
LIB_DIR = PACKAGE_DIR / "lib"
HEADER = PACKAGE_DIR / "include" / "slicemoe.h"


class SliceMoEError(RuntimeError):
    """A failure reported by the native library; ``status`` is its ``slicemoe_status`` code."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class NativeLibraryMissing(SliceMoEError):
    """The package was installed without its native library (or it cannot be loaded)."""


def status_name(status: int) -> str:
    """A status code by its name in slicemoe.h, as cffi read it: 6 -> "context full"."""
    names = ffi.typeof("enum slicemoe_status").elements
    return names[status].removeprefix("SLICEMOE_ERR_").replace("_", " ").lower() if status in names else f"status {status}"


def _cdef_source(header: Path) -> str:
    text = header.read_text()
    match = re.search(r"// cdef-begin[^\n]*\n(.*)// cdef-end", text, re.S)
    if match is None:
        raise NativeLibraryMissing(f"{header} has no cdef markers", 0)
    body = re.sub(r"//[^\n]*", "", match.group(1))
    return body.replace("SLICEMOE_API ", "")


def library_path() -> Path:
    """The libllama that carries the slicemoe_* API: $SLICEMOE_LIB, else the bundled one."""
    override = os.environ.get("SLICEMOE_LIB")
    if override:
        return Path(override)
    name = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")
    return LIB_DIR / name


ffi = cffi.FFI()
_lib = None


def lib():
    """The loaded native library (loaded on first use)."""
    global _lib
    if _lib is None:
        path = library_path()
        if not path.exists() or not HEADER.exists():
            raise NativeLibraryMissing(
                f"native library not found at {path}; reinstall with `pip install .` from the "
                "source tree so that the llama.cpp build runs", 0)
        ffi.cdef(_cdef_source(HEADER))
        try:
            _lib = ffi.dlopen(str(path))
        except OSError as exc:
            raise NativeLibraryMissing(f"cannot load {path}: {exc}", 0) from exc
    return _lib


def check(status: int) -> None:
    """Raise the native error message as a SliceMoEError unless status is SLICEMOE_OK."""
    if status != 0:
        message = ffi.string(lib().slicemoe_last_error()).decode("utf-8", "replace")
        raise SliceMoEError(message or status_name(status), status)


def string(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def build_info() -> dict:
    """What CMake recorded about this build (pinned versions, llama.cpp source tree, compiler)."""
    import json

    path = LIB_DIR / "build_info.json"
    if not path.exists():
        raise NativeLibraryMissing(f"{path} not found: the package was not installed by its build", 0)
    return json.loads(path.read_text())
