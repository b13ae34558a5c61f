"""The quality metrics tell good from bad: crisp beats blurred, many colours beat one, samples sit at the floor."""

import torch
import torch.nn.functional as F

from pdray.evaluation.metrics import (
    HUE_BINS,
    dominant_hue,
    edge_energy,
    entropy,
    foreground_brightness,
    haze,
    kernel_inception_distance,
)
from pdray.priors.diffusion import TOY_MODEL_DIR
from pdray.priors.toyworld.judge import load_judge
from pdray.priors.toyworld.world import COLOUR_NAMES, SHAPES, render_objects
from pdray.render.cameras import sample_cameras


def cubes(colours: list[int], seed: int = 0) -> torch.Tensor:
    n = len(colours)
    cameras = sample_cameras(n, generator=torch.Generator().manual_seed(seed))
    return render_objects(torch.full((n,), SHAPES.index("cube")), torch.tensor(colours), cameras, 32, 2)


def blurred(images: torch.Tensor, passes: int = 3) -> torch.Tensor:
    for _ in range(passes):
        images = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return images


def test_a_crisp_shape_is_less_hazy_and_has_more_edge_energy_than_its_blurred_copy():
    crisp = cubes([0, 1, 2, 3])
    soft = blurred(crisp)
    assert haze(crisp) < 0.5 * haze(soft)
    assert edge_energy(crisp) > 2 * edge_energy(soft)


def test_dominant_hues_and_entropy_count_colours():
    eight_colours = cubes([0, 1, 2, 3, 4, 5, 0, 1])
    one_colour = cubes([2] * 8)
    hues_many = [dominant_hue(img[None]) for img in eight_colours]
    hues_one = [dominant_hue(img[None]) for img in one_colour]
    assert len(set(hues_many)) == 6 and len(set(hues_one)) == 1
    assert entropy(hues_one) == 0.0 < entropy(hues_many)
    assert all(0 <= h < HUE_BINS for h in hues_many)
    assert dominant_hue(torch.ones(1, 3, 8, 8)) == -1  # nothing on the white background


def test_brightness_reads_the_foreground_only():
    dark = cubes([2, 2]) * 0.5 + 0.5 * (cubes([2, 2]) == 1.0)  # halve the object, keep the white background
    assert foreground_brightness(dark) < 0.75 * foreground_brightness(cubes([2, 2]))


def test_kid_of_a_distribution_to_itself_is_the_floor():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    shifted = torch.randn(64, 16, generator=g) + 0.5
    same, other = kernel_inception_distance(a, b), kernel_inception_distance(a, shifted)
    assert abs(same) < 0.05 < other


def test_set_quality_on_renders_of_the_world():
    from pdray.evaluation.quality import set_quality

    judge = load_judge(TOY_MODEL_DIR / "judge")
    reference = cubes([i % len(COLOUR_NAMES) for i in range(48)], seed=1)
    many = [img[None] for img in cubes([i % len(COLOUR_NAMES) for i in range(8)], seed=2)]
    one = [img[None] for img in cubes([4] * 8, seed=2)]
    good, collapsed = set_quality(many, "a cube", judge, reference), set_quality(one, "a cube", judge, reference)
    assert good["colour_entropy_fraction"] > 0.8 and collapsed["colour_entropy_fraction"] == 0.0
    assert good["kid"] < collapsed["kid"]
    assert good["agreement"] == 1.0 and good["confidence"] > 0.9
    blob = [blurred(img, passes=6) for img in many]
    assert set_quality(blob, "a cube", judge)["confidence"] < good["confidence"]
    assert set_quality(blob, "a cube", judge)["haze"] > good["haze"]
