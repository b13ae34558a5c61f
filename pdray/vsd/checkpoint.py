"""Checkpoints in the run folder: shards written by the processes that hold the state, a manifest written last.

checkpoints/SERIAL-step-STEP/ holds one ``particles-FIRST.safetensors`` per particle holder (a Ray particle actor
writes its own particles' weights and Adam moments: nothing is gathered to the driver), ``lora.safetensors`` (VSD
with a LoRA; written by one score replica, as all hold one LoRA) and ``manifest.json``: the step, the config digest
and which shard holds which particles. The driver writes the manifest last and atomically, once every shard is on
disk, and a checkpoint counts only once its manifest exists; the older checkpoints are deleted after that. Each
checkpoint gets a new folder (the serial counts up, whatever the step: a recovery goes back to an earlier step and
a stop may checkpoint a step twice), so a crash at any moment leaves the previous checkpoint standing. The run
folder must be on a filesystem every node sees (README, "Running on a Ray cluster"). Run folders of earlier
versions (checkpoints/latest/ with one particles.safetensors and state.json) are still read.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pdray.config import RunConfig, config_to_yaml
from pdray.files import atomic_path, write_json

MANIFEST = "manifest.json"
LORA_FILE = "lora.safetensors"
LEGACY_STATE = "state.json"  # checkpoints/latest/state.json of earlier versions


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


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _serial(folder: Path) -> int:
    return int(folder.name.split("-", 1)[0])


def _checkpoint_folders(root: Path) -> list[Path]:
    return [f for f in root.glob("[0-9]*-step-*") if f.is_dir()]


def new_checkpoint_folder(run_dir: Path, step: int) -> Path:
    """A new, empty checkpoints/SERIAL-step-STEP/ for the shards of ``step``: its serial is one above every folder
    there, complete or left half-written by a crash, so no complete checkpoint is ever written into."""
    root = run_dir.resolve() / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    serial = 1 + max((_serial(f) for f in _checkpoint_folders(root)), default=0)
    folder = root / f"{serial:06d}-step-{step:07d}"
    folder.mkdir()
    return folder


def write_particle_shard(folder: Path, particle_ids: list[int], tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """One holder's particles (names prefixed by the particle id, ``0003.field...``) -> {file name: particle ids}."""
    name = f"particles-{particle_ids[0]:04d}.safetensors"
    _save(tensors, folder / name)
    return {name: list(particle_ids)}


def write_lora_shard(folder: Path, tensors: dict[str, torch.Tensor]) -> str | None:
    """The LoRA's weights and AdamW moments -> the file name (None when the run trains no LoRA)."""
    if not tensors:
        return None
    _save(tensors, folder / LORA_FILE)
    return LORA_FILE


def commit_checkpoint(
    folder: Path, step: int, shards: dict[str, list[int]], lora: str | None, info: dict[str, Any]
) -> None:
    """Write the manifest (last, atomically): from now on this checkpoint counts; then delete the older ones."""
    missing = [name for name in [*shards, *([lora] if lora else [])] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder}: shards missing on disk: {missing}")
    write_json(folder / MANIFEST, {"step": step, **info, "particles": shards, "lora": lora})
    root = folder.parent
    for other in root.iterdir():
        if other != folder and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def save_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], info: dict[str, Any]
) -> Path:
    """A whole checkpoint from one process (the local executor): one particle shard, the LoRA, the manifest."""
    folder = new_checkpoint_folder(run_dir, step)
    particles = tensors["particles"]
    ids = sorted({int(name.split(".", 1)[0]) for name in particles})
    shards = write_particle_shard(folder, ids, particles) if ids else {}
    commit_checkpoint(folder, step, shards, write_lora_shard(folder, tensors.get("lora", {})), info)
    return folder


def checkpoint_folder(run_dir: Path) -> Path:
    """The newest checkpoint whose manifest exists (or an earlier version's checkpoints/latest)."""
    root = run_dir / "checkpoints"
    done = [f for f in _checkpoint_folders(root) if (f / MANIFEST).is_file()]
    if done:
        return max(done, key=_serial)
    for legacy in (root / "latest", root / "latest.old"):
        if (legacy / LEGACY_STATE).is_file():
            return legacy
    raise FileNotFoundError(f"no checkpoint in {root}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The checkpoint's manifest; an earlier version's state.json reads as one whose single shard holds every
    particle (``None``: look inside)."""
    if (folder / MANIFEST).is_file():
        return json.loads((folder / MANIFEST).read_text())
    info = json.loads((folder / LEGACY_STATE).read_text())
    lora = LORA_FILE if (folder / LORA_FILE).is_file() else None
    return {**info, "particles": {"particles.safetensors": None}, "lora": lora}


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run folder's last checkpoint, read without loading its tensors."""
    return int(read_manifest(checkpoint_folder(run_dir))["step"])


def read_particles(
    folder: Path, manifest: dict[str, Any], particle_ids: list[int] | None = None, optimiser: bool = True
) -> dict[str, torch.Tensor]:
    """The named particles' tensors (default: every particle), each read from its own shard; names keep the
    particle prefix. ``optimiser=False`` leaves the Adam moments on disk."""
    wanted = None if particle_ids is None else {f"{pid:04d}." for pid in particle_ids}
    out: dict[str, torch.Tensor] = {}
    for name, ids in manifest["particles"].items():
        if wanted is not None and ids is not None and not wanted & {f"{pid:04d}." for pid in ids}:
            continue
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file is no dict)
                prefix, rest = key[:5], key[5:]
                if (wanted is None or prefix in wanted) and (optimiser or not rest.startswith("optim.")):
                    out[key] = f.get_tensor(key)
    if particle_ids is not None:
        absent = [pid for pid in particle_ids if not any(k.startswith(f"{pid:04d}.") for k in out)]
        if absent:
            named = ", ".join(map(str, absent))
            raise KeyError(f"the checkpoint in {folder} holds no state for particle{'s' * (len(absent) > 1)} {named}")
    return out


def read_lora(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The LoRA's weights and AdamW moments ({} when the run trains none)."""
    if not manifest.get("lora"):
        return {}
    with safe_open(str(folder / manifest["lora"]), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The last checkpoint whole, in one process: (manifest, {"particles": ..., "lora": ...})."""
    folder = checkpoint_folder(run_dir)
    manifest = read_manifest(folder)
    lora = read_lora(folder, manifest)
    return manifest, {"particles": read_particles(folder, manifest), **({"lora": lora} if lora else {})}


def load_particle_tensors(run_dir: Path, particle_id: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and one particle's weights (no optimiser state, names without the particle prefix), read
    from its shard without loading the other particles."""
    folder = checkpoint_folder(run_dir)
    manifest = read_manifest(folder)
    tensors = read_particles(folder, manifest, [particle_id], optimiser=False)
    return manifest, {k[5:]: v for k, v in tensors.items()}
