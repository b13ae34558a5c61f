import json

import pytest
import torch
from safetensors.torch import save_file

from pdray.vsd.checkpoint import (
    checkpoint_folder,
    checkpoint_step,
    commit_checkpoint,
    load_checkpoint,
    load_particle_tensors,
    new_checkpoint_folder,
    read_manifest,
    read_particles,
    write_lora_shard,
    write_particle_shard,
)


def particle_state(ids: list[int], value: float) -> dict[str, torch.Tensor]:
    return {f"{pid:04d}.{name}": torch.full((3,), value + pid) for pid in ids for name in ("w", "optim.state.0.m")}


def write(run_dir, step: int, value: float, shards=((0, 1), (2,)), lora=True):
    """A checkpoint as the Ray executor writes one: a shard per holder, the LoRA, then the manifest."""
    folder = new_checkpoint_folder(run_dir, step)
    written = {}
    for ids in shards:
        written |= write_particle_shard(folder, list(ids), particle_state(list(ids), value))
    lora_file = write_lora_shard(folder, {"a": torch.ones(2) * value} if lora else {})
    commit_checkpoint(folder, step, written, lora_file, {"config_digest": "abc"})
    return folder


def test_shards_read_back_per_particle_and_whole(tmp_path):
    folder = write(tmp_path, 5, 10.0)
    manifest = read_manifest(folder)
    assert manifest["particles"] == {"particles-0000.safetensors": [0, 1], "particles-0002.safetensors": [2]}
    assert manifest["step"] == 5 and checkpoint_step(tmp_path) == 5
    mine = read_particles(folder, manifest, [2])
    assert set(mine) == {"0002.w", "0002.optim.state.0.m"} and torch.equal(mine["0002.w"], torch.full((3,), 12.0))
    _, weights = load_particle_tensors(tmp_path, 1)
    assert list(weights) == ["w"]  # no optimiser state, no prefix
    _, whole = load_checkpoint(tmp_path)
    assert len(whole["particles"]) == 6 and torch.equal(whole["lora"]["a"], torch.full((2,), 10.0))
    with pytest.raises(KeyError, match="holds no state for particle 7"):
        read_particles(folder, manifest, [1, 7])


def test_a_checkpoint_counts_only_once_its_manifest_is_written(tmp_path):
    first = write(tmp_path, 4, 1.0)
    # A crash while the next checkpoint's shards are written: a newer folder without a manifest.
    torn = new_checkpoint_folder(tmp_path, 8)
    write_particle_shard(torn, [0, 1], particle_state([0, 1], 2.0))
    assert checkpoint_folder(tmp_path) == first and checkpoint_step(tmp_path) == 4
    # The same step checkpointed twice (a stop right after a checkpoint, or a recovery going back) gets a new
    # folder: the complete one is never written into, and the older ones go once the new manifest exists.
    again = write(tmp_path, 4, 3.0)
    assert again != first and checkpoint_folder(tmp_path) == again
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [again.name]
    assert torch.equal(load_particle_tensors(tmp_path, 0)[1]["w"], torch.full((3,), 3.0))


def test_a_manifest_naming_a_missing_shard_is_refused(tmp_path):
    folder = new_checkpoint_folder(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match=r"particles-0000\.safetensors"):
        commit_checkpoint(folder, 1, {"particles-0000.safetensors": [0]}, None, {})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_folder(tmp_path)


def test_an_earlier_version_s_checkpoint_still_reads(tmp_path):
    legacy = tmp_path / "checkpoints" / "latest"
    legacy.mkdir(parents=True)
    save_file(particle_state([0, 1], 0.0), str(legacy / "particles.safetensors"))
    (legacy / "state.json").write_text(json.dumps({"step": 7, "config_digest": "x"}))
    assert checkpoint_step(tmp_path) == 7
    info, tensors = load_checkpoint(tmp_path)
    assert info["lora"] is None and set(tensors) == {"particles"} and len(tensors["particles"]) == 4
    assert torch.equal(load_particle_tensors(tmp_path, 1)[1]["w"], torch.full((3,), 1.0))
    write(tmp_path, 9, 0.0)  # the next checkpoint replaces it
    assert not legacy.exists() and checkpoint_step(tmp_path) == 9
