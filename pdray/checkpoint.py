"""Checkpoints in the run folder: safetensors for every tensor, JSON for the rest, swapped in atomically.

checkpoints/latest/ holds particles.safetensors, lora.safetensors (VSD only) and state.json (step, config
digest). A new checkpoint is written beside it and renamed into place, so a crash never leaves a torn one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pdray.config import RunConfig, config_to_yaml
from pdray.files import replace_folder


def config_digest(config: RunConfig) -> str:
    """A short fingerprint of the resolved config, stored with each checkpoint."""
    return hashlib.sha1(config_to_yaml(config).encode()).hexdigest()[:12]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state (Adam moments, step) and hyperparameters as flat named tensors."""
    state = optimizer.state_dict()
    out = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"state.{index}.{key}"] = tensor.detach().cpu().contiguous()
    for g, group in enumerate(state["param_groups"]):
        for key in ("lr",):
            out[f"group.{g}.{key}"] = torch.tensor(float(group[key]), dtype=torch.float64)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        kind, index, key = name.split(".", 2)
        if kind == "state":
            restored.setdefault(int(index), {})[key] = value
        elif kind == "group":
            state["param_groups"][int(index)][key] = float(value)
    state["state"] = restored
    optimizer.load_state_dict(state)


def save_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], info: dict[str, Any]
) -> Path:
    """Write checkpoints/latest atomically: each entry of tensors becomes NAME.safetensors."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, latest = root / "latest.tmp", root / "latest"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, group in tensors.items():
        save_file(group, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    replace_folder(tmp, latest)
    return latest


def checkpoint_folder(run_dir: Path) -> Path:
    """checkpoints/latest, or latest.old after a crash between the two renames of ``save_checkpoint``."""
    root = run_dir / "checkpoints"
    folder = root / "latest" if (root / "latest" / "state.json").exists() else root / "latest.old"
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"no checkpoint in {root}")
    return folder


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run folder's last checkpoint, read without loading its tensors."""
    return int(json.loads((checkpoint_folder(run_dir) / "state.json").read_text())["step"])


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """state.json and every NAME.safetensors of checkpoints/latest (falls back to latest.old after a crash)."""
    folder = checkpoint_folder(run_dir)
    info = json.loads((folder / "state.json").read_text())
    return info, {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}


def load_particle_tensors(run_dir: Path, particle_id: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and one particle's weights (no optimiser state, names without the particle prefix), read
    from particles.safetensors without loading the other particles."""
    folder = checkpoint_folder(run_dir)
    info = json.loads((folder / "state.json").read_text())
    prefix = f"{particle_id:04d}."
    with safe_open(str(folder / "particles.safetensors"), framework="pt") as f:
        mine = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (a safetensors file is no dict)
        names = [k for k in mine if not k.startswith(f"{prefix}optim.")]
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in names}
    if not tensors:
        raise KeyError(f"the checkpoint in {folder} holds no state for particle {particle_id}")
    return info, tensors
