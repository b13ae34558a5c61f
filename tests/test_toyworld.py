import random

import torch

from pdray.priors.diffusion import TOY_MODEL_DIR, DiffusionPrior
from pdray.priors.toyworld.captions import caption, parse_prompt
from pdray.priors.toyworld.judge import colour_entropy, load_judge, max_colour_entropy
from pdray.priors.toyworld.model import UNK, build_tokenizer
from pdray.priors.toyworld.world import SHAPES, render_objects, sample_world
from pdray.render.cameras import Cameras


def _front(n: int, azimuth: float = 0.0) -> Cameras:
    full = torch.ones(n)
    return Cameras(full * 15, full * azimuth, full * 1.5, full * 45)


def test_world_is_deterministic_per_seed():
    a = sample_world(6, torch.Generator().manual_seed(3), supersample=1)
    b = sample_world(6, torch.Generator().manual_seed(3), supersample=1)
    c = sample_world(6, torch.Generator().manual_seed(4), supersample=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.shapes, b.shapes)
    assert not torch.equal(a.images, c.images)


def test_shapes_are_distinguishable_and_asymmetric_ones_differ_by_view():
    n = len(SHAPES)
    images = render_objects(torch.arange(n), torch.zeros(n, dtype=torch.long), _front(n), 32, 1)
    masks = (images.mean(1) < 0.99).float()  # silhouettes on the white background
    for i in range(n):
        assert masks[i].sum() > 40, SHAPES[i]
        for j in range(i + 1, n):
            assert (masks[i] - masks[j]).abs().mean() > 0.02, (SHAPES[i], SHAPES[j])
    for name in ("mug", "chair", "house"):
        k = SHAPES.index(name)
        front = render_objects(torch.tensor([k]), torch.tensor([0]), _front(1, 0.0), 32, 1)
        back = render_objects(torch.tensor([k]), torch.tensor([0]), _front(1, 180.0), 32, 1)
        assert (front - back).abs().mean() > 0.02, name


def test_tokenizer_is_word_level_and_maps_unknown_words_to_unk():
    tok = build_tokenizer()
    ids = tok("A RED cube, side view").input_ids
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    unknown = tok("a pineapple of doom").input_ids
    assert unknown.count(tok.convert_tokens_to_ids(UNK)) == 3


def test_captions_and_prompt_parsing():
    rng = random.Random(0)
    captions = {caption(SHAPES.index("mug"), 0, 1, rng) for _ in range(200)}
    assert {"", "a mug", "a red mug", "a red mug, side view", "a mug, side view"} <= captions
    labels = parse_prompt("a red mug, side view")
    assert (labels.shape, labels.colour, labels.view, labels.view_matters) == ("mug", "red", "side", True)
    assert parse_prompt("a cube").colour is None and not parse_prompt("a cube, front view").view_matters


def test_caption_token_table_matches_the_tokenizer():
    from pdray.priors.toyworld.train import caption_token_table

    tok = build_tokenizer()
    ids, probs = caption_token_table(tok)
    assert abs(float(probs.sum()) - 1) < 1e-6

    def padded(text: str) -> list[int]:
        return tok(text, padding="max_length", max_length=ids.shape[-1]).input_ids

    assert ids[SHAPES.index("mug"), 0, 1, 4].tolist() == padded("a red mug, side view")
    assert ids[SHAPES.index("mug"), 0, 1, 0].tolist() == padded("")


def test_colour_entropy():
    assert colour_entropy(["red"] * 8) == 0.0
    assert abs(colour_entropy(["red", "green", "blue", "yellow", "purple", "orange"]) - max_colour_entropy()) < 1e-9


def _tiny_cfg(**overrides):
    from pdray.priors.toyworld.train import ToyTrainConfig

    small = dict(pool_size=32, render_chunk=32, vae_steps=2, vae_batch_size=4, unet_steps=2, unet_batch_size=4)
    return ToyTrainConfig(**{**small, "warmup_steps": 1, "judge_steps": 2, "judge_batch_size": 4, **overrides})


def test_a_tiny_training_run_works_end_to_end(tmp_path):
    from pdray.priors.sampling import sample_images
    from pdray.priors.toyworld.train import train_toy_prior

    report = train_toy_prior(tmp_path / "prior", _tiny_cfg())
    assert report["unet_steps_done"] == 2 and report["scaling_factor"] > 0
    prior = DiffusionPrior(tmp_path / "prior", device="cpu")
    assert prior.image_resolution == 32 and prior.latent_channels == 4
    assert sample_images(prior, ["a cube"], steps=2, progress=False).shape == (1, 3, 32, 32)
    load_judge(tmp_path / "prior" / "judge")


def test_fine_tuning_keeps_vae_and_judge_and_a_stopped_run_leaves_a_prior(tmp_path):
    from safetensors.torch import load_file

    from pdray.priors.toyworld.train import train_toy_prior

    train_toy_prior(tmp_path / "base", _tiny_cfg())
    # max_minutes=0: the UNet phase stops after its first step, and still writes the prior.
    report = train_toy_prior(
        tmp_path / "tuned", _tiny_cfg(unet_steps=50, init_from=str(tmp_path / "base"), max_minutes=0)
    )
    assert report["unet_steps_done"] == 1 and report["vae_loss"] is None
    assert not (tmp_path / "tuned.tmp").exists() and not (tmp_path / "tuned.old").exists()

    def weights(folder, part, file):
        return load_file(tmp_path / folder / part / file)

    for part, file in [("vae", "diffusion_pytorch_model.safetensors"), ("judge", "judge.safetensors")]:
        base, tuned = weights("base", part, file), weights("tuned", part, file)
        assert all(torch.equal(base[k], tuned[k]) for k in base)
    base, tuned = (weights(f, "unet", "diffusion_pytorch_model.safetensors") for f in ("base", "tuned"))
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    DiffusionPrior(tmp_path / "tuned", device="cpu")


def test_shipped_judge_classifies_fresh_renders():
    judge = load_judge(TOY_MODEL_DIR / "judge")
    batch = sample_world(96, torch.Generator().manual_seed(99))
    judged = judge.classify(batch.images)
    shape_acc = sum(s == SHAPES[i] for s, i in zip(judged["shape"], batch.shapes.tolist(), strict=True)) / 96
    assert shape_acc > 0.9


def test_shipped_prior_loads_offline_and_draws_the_named_shape_and_colour():
    from pdray.priors.sampling import sample_images

    prior = DiffusionPrior("toyworld", device="cpu")
    judge = load_judge(TOY_MODEL_DIR / "judge")
    prompts = ["a red cube", "a blue cone", "a green mug", "a yellow torus"]
    images = sample_images(prior, [p for p in prompts for _ in range(3)], steps=20, cfg=7.5, progress=False)
    agreement = torch.cat([judge.agreement(images[3 * i : 3 * i + 3], p) for i, p in enumerate(prompts)])
    assert agreement.mean() >= 0.75
