"""pdray.backends: an optional CUDA extension is available only after a real try, tried once per process; without
CUDA it is never imported. Fake extensions stand in for the real ones, so these run anywhere and fast."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from pdray import backends
from pdray.geometry import hashgrid
from pdray.render import raster

NAMES = ("tinycudann", "nvdiffrast", "nerfacc")
REASONS = {
    "tinycudann": backends.tinycudann_unavailable_reason,
    "nvdiffrast": backends.nvdiffrast_unavailable_reason,
    "nerfacc": backends.nerfacc_unavailable_reason,
}


@pytest.fixture(autouse=True)
def fresh_tries(monkeypatch: pytest.MonkeyPatch):
    """Every test starts and ends with no try remembered, and with no PDRAY_DISABLE_BACKENDS."""
    monkeypatch.delenv(backends.DISABLE_ENV, raising=False)
    backends.forget_tries()
    yield
    backends.forget_tries()


class Failing:
    """A stand-in for an extension's entry point (Encoding, RasterizeCudaContext, OccGridEstimator) that fails."""

    calls = 0

    def __init__(self, *args, **kwargs) -> None:
        type(self).calls += 1
        raise RuntimeError("ninja: build stopped: subcommand failed")


def fake_extensions(monkeypatch: pytest.MonkeyPatch) -> type[Failing]:
    """CUDA 'available', and each extension a module whose first call raises; returns the counter of calls."""
    failing = type("Failing", (Failing,), {"calls": 0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tinycudann", types.SimpleNamespace(Encoding=failing))
    nvdiffrast = types.ModuleType("nvdiffrast")
    nvdiffrast.torch = types.SimpleNamespace(RasterizeCudaContext=failing)
    monkeypatch.setitem(sys.modules, "nvdiffrast", nvdiffrast)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", nvdiffrast.torch)
    monkeypatch.setitem(sys.modules, "nerfacc", types.SimpleNamespace(OccGridEstimator=failing))
    return failing


def test_without_cuda_no_extension_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in (*NAMES, "nvdiffrast.torch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    asked = []

    class Spy:
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in NAMES:
                asked.append(fullname)
            return None

    monkeypatch.setattr(sys, "meta_path", [Spy(), *sys.meta_path])
    assert {name: reason() for name, reason in REASONS.items()} == dict.fromkeys(NAMES, "CUDA is not available")
    assert hashgrid.tcnn_unavailable_reason() == "CUDA is not available"
    assert raster.nvdiffrast_unavailable_reason() == "CUDA is not available"
    assert asked == []


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_try_is_the_reason_and_is_remembered(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    failing = fake_extensions(monkeypatch)
    reason = REASONS[name]()
    assert reason is not None
    assert name in reason and "RuntimeError" in reason and "ninja: build stopped" in reason
    assert failing.calls == 1
    assert REASONS[name]() == reason
    assert failing.calls == 1, "the try ran again: it must run once per process"
    backends.forget_tries()
    assert REASONS[name]() == reason
    assert failing.calls == 2


def test_auto_never_picks_an_extension_whose_try_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_extensions(monkeypatch)
    assert hashgrid.encoding_backend_name("auto") == "torch"
    assert raster.backend_name("auto") == "torch"
    assert "tinycudann" in hashgrid.tcnn_unavailable_reason()
    assert "nvdiffrast" in raster.nvdiffrast_unavailable_reason()


def test_an_extension_that_does_not_import_names_the_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nerfacc", None)  # makes `import nerfacc` fail
    reason = backends.nerfacc_unavailable_reason()
    assert reason.startswith("nerfacc does not import (ModuleNotFoundError:")


def test_a_long_build_log_is_cut_to_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'nerfacc_cuda':\n" + "nvcc fatal\n" * 500)

    monkeypatch.setitem(sys.modules, "nerfacc", types.SimpleNamespace(OccGridEstimator=broken))
    reason = backends.nerfacc_unavailable_reason()
    assert "\n" not in reason and len(reason) < 600 and reason.endswith("...)")


def test_disabled_by_the_environment_without_a_try(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = fake_extensions(monkeypatch)
    monkeypatch.setenv(backends.DISABLE_ENV, "nvdiffrast, nerfacc")
    assert backends.nvdiffrast_unavailable_reason() == f"disabled by {backends.DISABLE_ENV}"
    assert backends.nerfacc_unavailable_reason() == f"disabled by {backends.DISABLE_ENV}"
    assert failing.calls == 0
    assert "failed its try" in backends.tinycudann_unavailable_reason()
    monkeypatch.setenv(backends.DISABLE_ENV, "all")
    assert backends.tinycudann_unavailable_reason() == f"disabled by {backends.DISABLE_ENV}"


def test_an_unknown_extension_is_an_error() -> None:
    with pytest.raises(ValueError, match="no such CUDA extension"):
        backends.cuda_extension_unavailable_reason("cupy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real tries need CUDA")
def test_the_real_tries_answer_on_this_gpu() -> None:
    """On a GPU each real try gives None or a one-line reason, and never raises (gpu_check.sh prints them)."""
    for name, reason in REASONS.items():
        answer = reason()
        assert answer is None or (name in answer and "\n" not in answer), answer
