"""Optional CUDA extensions (tinycudann, nvdiffrast): whether `auto` would use one, and why not."""

from __future__ import annotations

import importlib

import torch


def cuda_extension_unavailable_reason(module: str) -> str | None:
    """Why ``auto`` would not use the CUDA extension ``module`` here, or None when it would.

    CUDA is checked first, so on a CPU-only machine the extension is never imported.
    """
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as error:
        return f"{module.split('.')[0]} does not import ({error})"
    return None


def nerfacc_unavailable_reason() -> str | None:
    """Why ``auto`` would not march rays with nerfacc here, or None when it would."""
    return cuda_extension_unavailable_reason("nerfacc")
