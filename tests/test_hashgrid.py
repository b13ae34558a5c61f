"""Grid encodings: the torch hash grid against a naive reference, the dense grid, and backend choice."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch

from pdray.geometry.hashgrid import (
    DenseGridEncoding,
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


@pytest.mark.skipif(tcnn_unavailable_reason() is not None, reason=f"tcnn backend: {tcnn_unavailable_reason()}")
def test_tcnn_matches_torch_hashgrid() -> None:
    tcnn_enc = TcnnHashGridEncoding(**SMALL)
    torch_enc = HashGridEncoding(**SMALL).cuda()
    tcnn_params = tcnn_enc.encoding.params
    with torch.no_grad():
        torch_enc.params.copy_(tcnn_params.view(-1, 2).t())
    # Keep clear of the outer half cell, where tinycudann's index wraps and float rounding may differ.
    x = torch.rand(500, 3, device="cuda") * 0.8 + 0.1
    out_tcnn, out_torch = tcnn_enc(x), torch_enc(x)
    torch.testing.assert_close(out_tcnn, out_torch, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(out_torch)
    (out_tcnn * upstream).sum().backward()
    (out_torch * upstream).sum().backward()
    torch.testing.assert_close(tcnn_params.grad.view(-1, 2).t(), torch_enc.params.grad, rtol=1e-4, atol=1e-5)
