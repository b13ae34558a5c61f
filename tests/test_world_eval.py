"""The toy world as a run's reference: the view and shape read per view, the ceiling on the world's own renders,
and the kernel distance to them, with the shipped judge."""

from __future__ import annotations

import pytest

from pdray.evaluation.world_eval import view_read, view_targets, views_matter, world_kid, world_renders
from pdray.priors.diffusion import TOY_MODEL_DIR
from pdray.priors.toyworld.judge import load_judge
from pdray.render.cameras import orbit_cameras


@pytest.fixture(scope="module")
def judge():
    return load_judge(TOY_MODEL_DIR / "judge")


def test_only_clear_front_side_and_back_cameras_are_judged():
    targets = view_targets(orbit_cameras(8))
    assert targets == ["front", None, "side", None, "back", None, "side", None]
    assert view_targets(orbit_cameras(4)) == ["front", "side", "back", "side"]
    assert views_matter("a house") and views_matter("a red mug, side view") and not views_matter("a cube")


@pytest.mark.parametrize("prompt", ["a house", "a chair", "a red mug"])
def test_the_worlds_own_renders_read_right_and_one_view_from_every_side_does_not(judge, prompt):
    cameras = orbit_cameras(8, distance=1.5, fov=45.0)
    world = world_renders(prompt, cameras, 32)
    assert world.shape == (6 * 8, 3, 32, 32)
    targets = view_targets(cameras)
    for instance in world.split(8):
        assert view_read(judge, instance, targets, prompt) == {"views_right": 1.0, "shape_right": 1.0}
    alike = world[:1].expand(8, -1, -1, -1)  # the front view seen from every side: right on the front only
    assert view_read(judge, alike, targets, prompt)["views_right"] == 0.25
    assert world_kid(judge, world[:24], world) < 0.1 * world_kid(judge, alike.repeat(3, 1, 1, 1), world)


def test_colour_open_prompts_get_every_colour_and_symmetric_shapes_no_view_read(judge):
    cameras = orbit_cameras(4)
    colours = judge.classify(world_renders("a cube", cameras, 32)[::4])["colour"]
    assert sorted(colours) == sorted(["red", "green", "blue", "yellow", "purple", "orange"])
    read = view_read(judge, world_renders("a cube", cameras, 32)[:4], view_targets(cameras), "a cube")
    assert read == {"views_right": None, "shape_right": 1.0}
    with pytest.raises(ValueError, match="names no shape"):
        world_renders("a pineapple", cameras, 32)


def test_world_kid_over_batches_is_world_kid_over_their_concatenation(judge):
    cameras = orbit_cameras(4)
    world = world_renders("a mug", cameras, 32)
    views = world_renders("a red mug", cameras, 32, seed=3)
    whole = world_kid(judge, views, world)
    assert world_kid(judge, views.split(4), world) == pytest.approx(whole, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        world_kid(judge, [views[:1]], world)
