"""slicemoe-gguf: SliceMoE (AMAT bit-sliced experts + slice cache) on llama.cpp."""

__version__ = "0.1.0"

from ._native import NativeLibraryMissing, SliceMoEError
from .runtime import GenerationResult, Model, Sampling, library_info

__all__ = ["GenerationResult", "Model", "NativeLibraryMissing", "Sampling", "SliceMoEError", "library_info"]
