"""Grid encodings: the torch hash grid against a naive reference, the dense grid, and backend choice."""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import asdict

import pytest
import torch

from pdray.geometry.hashgrid import (
    DenseGridEncoding,
    GridConfig,
    HashGridEncoding,
    TcnnHashGridEncoding,
    encoding_backend_name,
    make_encoding,
    tcnn_unavailable_reason,
)

# 4 levels of resolution 8, 16, 32, 64 with 2**12 entries per level: two dense levels, two hashed.
SMALL = {
    "n_levels": 4,
    "n_features_per_level": 2,
    "log2_hashmap_size": 12,
    "base_resolution": 8,
    "per_level_scale": 2.0,
}


def reference_hashgrid(x: torch.Tensor, params: torch.Tensor, **cfg: float) -> torch.Tensor:
    """tinycudann's hash grid written level by level and corner by corner. params: [T, F] (tcnn layout)."""
    n_levels, max_size = int(cfg["n_levels"]), 2 ** int(cfg["log2_hashmap_size"])
    outputs, offset = [], 0
    for level in range(n_levels):
        scale = 2.0 ** (level * math.log2(cfg["per_level_scale"])) * cfg["base_resolution"] - 1.0
        resolution = math.ceil(scale) + 1
        size = -(-min(resolution**3, max_size) // 8) * 8
        table = params[offset : offset + size]
        offset += size
        pos = x * torch.tensor(scale, dtype=torch.float32) + 0.5
        lower = pos.floor()
        frac = pos - lower
        lower = lower.long()
        feature = torch.zeros(x.shape[0], params.shape[1])
        for corner in itertools.product((0, 1), repeat=3):
            c = [lower[:, axis] + corner[axis] for axis in range(3)]
            weight = torch.ones(x.shape[0])
            for axis in range(3):
                weight = weight * (frac[:, axis] if corner[axis] else 1.0 - frac[:, axis])
            if resolution**3 <= max_size:
                index = c[0] + c[1] * resolution + c[2] * resolution**2
            else:
                index = ((c[0] * 1) ^ (c[1] * 2654435761) ^ (c[2] * 805459861)) & 0xFFFFFFFF
            feature = feature + weight[:, None] * table[index % size]
        outputs.append(feature)
    return torch.cat(outputs, dim=1)


def test_hashgrid_matches_reference_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    enc = HashGridEncoding(**SMALL)
    assert enc.n_dense_levels == 2  # the test covers both dense and hashed levels
    with torch.no_grad():
        enc.params.uniform_(-1.0, 1.0)
    ref_params = enc.params.detach().t().clone().requires_grad_(True)
    x = torch.cat([torch.rand(200, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])])

    out = enc(x)
    expected = reference_hashgrid(x, ref_params, **SMALL)
    assert out.shape == (203, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(enc.params.grad, ref_params.grad.t(), rtol=1e-5, atol=1e-5)


def test_hashgrid_gradients_reach_every_level() -> None:
    enc = HashGridEncoding(**SMALL)
    enc(torch.rand(64, 3)).square().sum().backward()
    for level in range(4):
        start, size = int(enc.offsets[level]), int(enc.sizes[level])
        assert enc.params.grad[:, start : start + size].abs().sum() > 0


def test_hashgrid_init_is_small_uniform() -> None:
    enc = HashGridEncoding(**SMALL)
    assert enc.params.abs().max() <= 1e-4
    assert enc.params.shape == (2, int(enc.sizes.sum()))


def test_dense_grid_shape_gradient_and_vertices() -> None:
    enc = DenseGridEncoding(
        n_levels=2, n_features_per_level=3, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0
    )
    assert [g.shape[-1] for g in enc.grids] == [4, 8]
    x = torch.rand(50, 3, requires_grad=True)
    out = enc(x)
    assert out.shape == (50, 6)
    out.square().sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in enc.grids)
    # At a vertex, the encoding is that vertex's features: grid [1, F, z, y, x], x in [0, 1] spans 0..res-1.
    with torch.no_grad():
        enc.grids[0].uniform_(-1.0, 1.0)
    i, j, k = 1, 2, 3
    vertex = torch.tensor([[i / 3, j / 3, k / 3]])
    torch.testing.assert_close(enc(vertex)[0, :3], enc.grids[0][0, :, k, j, i].detach())


def test_dense_grid_rejects_levels_over_budget() -> None:
    with pytest.raises(ValueError, match="log2_hashmap_size"):
        DenseGridEncoding(n_levels=3, base_resolution=16, per_level_scale=2.0, log2_hashmap_size=12)


def test_auto_backend_on_cpu_is_torch_and_never_imports_tinycudann(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "tinycudann", raising=False)
    assert isinstance(make_encoding("hashgrid", "auto", **SMALL), HashGridEncoding)
    assert isinstance(make_encoding("dense", "auto", n_levels=2, base_resolution=4), DenseGridEncoding)
    assert encoding_backend_name("auto") == "torch"
    assert encoding_backend_name("torch") == "torch"
    assert tcnn_unavailable_reason() == "CUDA is not available"
    assert "tinycudann" not in sys.modules


def test_tcnn_backend_without_tinycudann_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # makes `import tinycudann` fail
    with pytest.raises(ImportError, match="tinycudann"):
        make_encoding("hashgrid", "tcnn", **SMALL)


def test_dense_grid_has_no_tcnn_backend() -> None:
    with pytest.raises(ValueError, match="torch backend"):
        make_encoding("dense", "tcnn", n_levels=2)


def test_parity_numbers_are_recorded(record_parity, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PDRAY_PARITY_OUT", str(tmp_path))
    record_parity(max_abs=0.5, pixels=3)
    (line,) = (tmp_path / "parity.jsonl").read_text().splitlines()
    assert json.loads(line) == {
        "test": "tests/test_hashgrid.py::test_parity_numbers_are_recorded",
        "max_abs": 0.5,
        "pixels": 3.0,
    }


PROLIFICDREAMER = {k: v for k, v in asdict(GridConfig()).items() if k not in ("kind", "backend")}
"""The NeRF particles' hash grid in the paper's configuration: 16 levels, 2**19 entries, up to 2048 per side."""

TCNN_REASON = tcnn_unavailable_reason()


@pytest.mark.skipif(TCNN_REASON is not None, reason=f"tinycudann parity needs it on CUDA: {TCNN_REASON}")
@pytest.mark.parametrize("grid", [SMALL, PROLIFICDREAMER], ids=["small", "prolificdreamer"])
def test_tcnn_hashgrid_matches_the_torch_hashgrid(grid: dict, record_parity) -> None:
    """Same table, same points: outputs, table gradients and point gradients agree to float32 rounding."""
    torch.manual_seed(0)
    tcnn_enc = TcnnHashGridEncoding(**grid)
    torch_enc = HashGridEncoding(**grid).cuda()
    n_features = grid["n_features_per_level"]
    params = tcnn_enc.encoding.params
    assert params.numel() == torch_enc.params.numel()  # the same level sizes
    with torch.no_grad():
        params.uniform_(-1.0, 1.0)  # tinycudann's own init (+-1e-4) would hide errors below any useful tolerance
        torch_enc.params.copy_(params.view(-1, n_features).t())  # its [T, F] table is the torch grid's [F, T]
    # Inside the outer half cell, where tinycudann's index wrap and pdray's modulo could part on rounding.
    x_tcnn = (torch.rand(8192, 3, device="cuda") * 0.8 + 0.1).requires_grad_()
    x_torch = x_tcnn.detach().clone().requires_grad_()
    out_tcnn, out_torch = tcnn_enc(x_tcnn), torch_enc(x_torch)
    upstream = torch.randn_like(out_torch)
    (out_tcnn * upstream).sum().backward()
    (out_torch * upstream).sum().backward()
    grad_tcnn = params.grad.view(-1, n_features).t()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert x_tcnn.grad is not None, "tinycudann gave no gradient with respect to the points"
    record_parity(
        points=x_tcnn.shape[0],
        output_max_abs=(out_tcnn - out_torch).abs().max(),
        output_scale=out_torch.abs().max(),
        param_grad_max_abs=(grad_tcnn - torch_enc.params.grad).abs().max(),
        param_grad_relative=relative(grad_tcnn, torch_enc.params.grad),
        point_grad_max_abs=(x_tcnn.grad - x_torch.grad).abs().max(),
        point_grad_relative=relative(x_tcnn.grad, x_torch.grad),
    )
    torch.testing.assert_close(out_tcnn, out_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_tcnn, torch_enc.params.grad, rtol=1e-4, atol=1e-4)
    # d(out)/dx scales with the finest level's resolution (up to 2048), so compare it relative to its size.
    assert relative(x_tcnn.grad, x_torch.grad) < 1e-3
