"""Optional CUDA extensions (tinycudann, nvdiffrast, nerfacc): whether ``auto`` would use one, and why not.

An extension counts as available only after a real try on this machine's GPU, not because it imports: nvdiffrast and
nerfacc compile their CUDA code on first use, and tinycudann can import yet lack kernels for this GPU, so each try
runs the smallest piece of work pdray would ask of it, forward and (for tinycudann) backward:

- ``tinycudann``: a 2-level HashGrid ``Encoding`` on 8 points;
- ``nvdiffrast``: a ``RasterizeCudaContext`` rasterising one triangle at 8 x 8;
- ``nerfacc``: ``OccGridEstimator(...).sampling`` of 4 rays through a fully occupied 8^3 grid.

An extension that does not import ("does not import (...)"), or whose try raises or gives a wrong answer ("failed its
try on this GPU (...)": a JIT build that breaks, say), is unavailable with the error as its reason, never an error of
the caller. Each extension is tried once per process (the first to ask; later callers get the same answer). Without
CUDA the reason is "CUDA is not available" and the extension is never imported. The environment variable
``PDRAY_DISABLE_BACKENDS`` (comma-separated names, or ``all``) rules extensions out without a try, e.g. where an
earlier process found one broken and a rebuild would only cost time again (``scripts/gpu_check.sh`` uses it).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

DISABLE_ENV = "PDRAY_DISABLE_BACKENDS"
"""Comma-separated extensions (tinycudann, nvdiffrast, nerfacc) or ``all`` that ``auto`` must not use."""

_tried: dict[str, str | None] = {}
_lock = threading.Lock()


def _try_tinycudann(tcnn: Any) -> None:
    config = {
        "otype": "HashGrid",
        "n_levels": 2,
        "n_features_per_level": 2,
        "log2_hashmap_size": 10,
        "base_resolution": 4,
        "per_level_scale": 2.0,
    }
    encoding = tcnn.Encoding(3, config, dtype=torch.float32)
    x = torch.rand(8, 3, device="cuda").requires_grad_()
    y = encoding(x).float()
    y.square().sum().backward()
    torch.cuda.synchronize()
    if tuple(y.shape) != (8, 4) or not torch.isfinite(y).all():
        raise RuntimeError(f"its encoding gave {tuple(y.shape)} values (finite: {bool(torch.isfinite(y).all())})")
    grads = [p.grad for p in encoding.parameters()]
    if not grads or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError("its backward gave no finite gradient of the grid")


def _try_nvdiffrast(dr: Any) -> None:
    context = dr.RasterizeCudaContext()  # on the current CUDA device
    pos = torch.tensor([[[-0.8, -0.8, 0.0, 1.0], [0.8, -0.8, 0.0, 1.0], [0.0, 0.8, 0.0, 1.0]]], device="cuda")
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32, device="cuda")
    raster, _ = dr.rasterize(context, pos, tri, (8, 8))
    torch.cuda.synchronize()
    covered = int((raster[..., 3] > 0).sum())
    if tuple(raster.shape) != (1, 8, 8, 4) or not 0 < covered < 64:
        raise RuntimeError(f"one triangle rasterised to {tuple(raster.shape)} covering {covered} of 64 pixels")


def _try_nerfacc(nerfacc: Any) -> None:
    estimator = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=8).to("cuda")
    estimator.binaries.fill_(True)
    origins = torch.tensor([[0.0, 0.0, -3.0]], device="cuda").expand(4, 3).contiguous()
    dirs = torch.nn.functional.normalize(
        torch.tensor([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0], [0.0, 0.1, 1.0], [-0.1, -0.1, 1.0]], device="cuda"), dim=-1
    )
    index, starts, ends = estimator.sampling(origins, dirs, render_step_size=0.1, near_plane=0.0, far_plane=10.0)
    torch.cuda.synchronize()
    if len(index) == 0 or set(index.tolist()) != {0, 1, 2, 3} or not bool((ends > starts).all()):
        raise RuntimeError(f"4 rays through an occupied grid gave {len(index)} samples on rays {set(index.tolist())}")


PROBES: dict[str, tuple[str, Callable[[Any], None]]] = {
    "tinycudann": ("tinycudann", _try_tinycudann),
    "nvdiffrast": ("nvdiffrast.torch", _try_nvdiffrast),
    "nerfacc": ("nerfacc", _try_nerfacc),
}
"""Each extension's module and its real try of it: returns when the extension works here, raises otherwise."""


def cuda_extension_unavailable_reason(name: str) -> str | None:
    """Why ``auto`` would not use the CUDA extension ``name`` (a key of ``PROBES``) here, or None when it would.

    CUDA is checked first (on every call, cheaply), so on a CPU-only machine the extension is never imported; then
    ``PDRAY_DISABLE_BACKENDS``; then the real try, once per process.
    """
    name = name.split(".")[0]
    if name not in PROBES:
        raise ValueError(f"no such CUDA extension {name!r}; known: {', '.join(PROBES)}")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    disabled = {part.strip() for part in os.environ.get(DISABLE_ENV, "").split(",")}
    if name in disabled or "all" in disabled:
        return f"disabled by {DISABLE_ENV}"
    with _lock:
        if name not in _tried:
            _tried[name] = _try(name)
        return _tried[name]


def _try(name: str) -> str | None:
    module_name, probe = PROBES[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # not installed, or a broken install (a missing shared library, say)
        return f"{name} does not import ({type(error).__name__}: {_first_lines(error)})"
    try:
        probe(module)
    except Exception as error:  # any failure of the try (JIT build, kernel, wrong answer) rules it out
        return f"{name} failed its try on this GPU ({type(error).__name__}: {_first_lines(error)})"
    return None


def forget_tries() -> None:
    """Forget every try made in this process, so the next question tries again (for tests)."""
    with _lock:
        _tried.clear()


def tinycudann_unavailable_reason() -> str | None:
    """Why ``auto`` would not encode hash grids with tinycudann here, or None when it would."""
    return cuda_extension_unavailable_reason("tinycudann")


def nvdiffrast_unavailable_reason() -> str | None:
    """Why ``auto`` would not rasterise with nvdiffrast here, or None when it would."""
    return cuda_extension_unavailable_reason("nvdiffrast")


def nerfacc_unavailable_reason() -> str | None:
    """Why ``auto`` would not march rays with nerfacc here, or None when it would."""
    return cuda_extension_unavailable_reason("nerfacc")


def _first_lines(error: BaseException, limit: int = 400) -> str:
    """The error's message on one line, cut to ``limit`` characters (JIT build errors run to pages)."""
    text = " ".join(str(error).split()) or "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."
