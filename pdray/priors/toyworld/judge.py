"""The toy world's judge: a small classifier of shape, colour and view, the analogue of CLIP R-precision.

It answers "does this image show what the prompt says?" for renders and samples, and gives a feature
vector per image for diversity measures. Trained on fresh renders of the world, shipped beside the prior.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pdray.priors.toyworld.captions import parse_prompt
from pdray.priors.toyworld.world import ASYMMETRIC_SHAPES, COLOUR_NAMES, SHAPES, VIEWS

FEATURE_DIM = 128


class Judge(nn.Module):
    """A CNN on 32x32 RGB in [0, 1] with three heads: shape, colour and view."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.body = nn.Sequential(
            block(3, width),
            nn.AvgPool2d(2),
            block(width, 2 * width),
            nn.AvgPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, FEATURE_DIM),
            nn.SiLU(),
        )
        self.shape_head = nn.Linear(FEATURE_DIM, len(SHAPES))
        self.colour_head = nn.Linear(FEATURE_DIM, len(COLOUR_NAMES))
        self.view_head = nn.Linear(FEATURE_DIM, len(VIEWS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] (resized to 32x32) -> features [B, FEATURE_DIM]."""
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(images)
        return self.shape_head(f), self.colour_head(f), self.view_head(f)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The judged shape, colour and view name of each image."""
        shape, colour, view = self(images)
        return {
            "shape": [SHAPES[i] for i in shape.argmax(-1).tolist()],
            "colour": [COLOUR_NAMES[i] for i in colour.argmax(-1).tolist()],
            "view": [VIEWS[i] for i in view.argmax(-1).tolist()],
        }

    def dominant_colour(self, images: torch.Tensor) -> str:
        """The colour the judge names most often over images (one particle's views)."""
        colours = self.classify(images)["colour"]
        return max(dict.fromkeys(colours), key=colours.count)

    @torch.no_grad()
    def confidence(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Per image, the judge's probability of what the prompt names: p(shape), times p(colour) when the
        prompt gives one. Stricter than ``agreement``: a blob that is barely a cube scores low."""
        wanted = parse_prompt(prompt)
        shape, colour, _ = self(images)
        p = torch.ones(images.shape[0])
        if wanted.shape is not None:
            p = p * shape.softmax(-1)[:, SHAPES.index(wanted.shape)].cpu()
        if wanted.colour is not None:
            p = p * colour.softmax(-1)[:, COLOUR_NAMES.index(wanted.colour)].cpu()
        return p

    @torch.no_grad()
    def agreement(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Per image, 1.0 when the judge sees what the prompt names (shape, colour if given, view if it matters)."""
        wanted = parse_prompt(prompt)
        judged = self.classify(images)
        ok = []
        for i in range(images.shape[0]):
            good = wanted.shape is None or judged["shape"][i] == wanted.shape
            good &= wanted.colour is None or judged["colour"][i] == wanted.colour
            if wanted.view_matters and wanted.view in VIEWS:
                good &= judged["view"][i] == wanted.view
            ok.append(float(good))
        return torch.tensor(ok)


def colour_entropy(colours: list[str]) -> float:
    """Entropy (nats) of the empirical distribution of judged colours; log(6) is the uniform maximum."""
    counts = torch.tensor([colours.count(c) for c in COLOUR_NAMES], dtype=torch.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def max_colour_entropy() -> float:
    return math.log(len(COLOUR_NAMES))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur and noise so the judge also reads distilled and sampled images, not only clean renders."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator).to(images.device) * 0.7
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    sigma = torch.rand(b, 1, 1, 1, generator=generator).to(images.device) * 0.06
    return ((1 - mix) * images + mix * blur + sigma * noise).clamp(0, 1)


def train_judge(pool: dict[str, torch.Tensor], steps: int, batch_size: int, seed: int, device: str = "cpu") -> Judge:
    """Train a judge on a pool of renders (uint8 images + labels), augmented each step.

    The view loss only counts for asymmetric shapes, whose views differ.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    asym = torch.tensor([s in ASYMMETRIC_SHAPES for s in SHAPES], device=device)
    bar = tqdm(range(steps), desc="judge")
    for _ in bar:
        idx = torch.randint(len(pool["images"]), (batch_size,), generator=generator).to(device)
        images = pool["images"][idx].float() / 255
        shapes, colours, views = pool["shapes"][idx], pool["colours"][idx], pool["views"][idx]
        shape, colour, view = judge(augment(images, generator))
        mask = asym[shapes].float()
        view_loss = (F.cross_entropy(view, views, reduction="none") * mask).sum() / mask.sum().clamp(min=1)
        loss = F.cross_entropy(shape, shapes) + F.cross_entropy(colour, colours) + view_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return judge.eval()


def save_judge(judge: Judge, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in judge.state_dict().items()}, str(folder / "judge.safetensors"))
    (folder / "config.json").write_text(json.dumps({"shapes": SHAPES, "colours": COLOUR_NAMES, "views": VIEWS}))


def load_judge(folder: Path, device: str = "cpu") -> Judge:
    """Load a judge saved by save_judge (safetensors only: no pickle)."""
    config = json.loads((folder / "config.json").read_text())
    if tuple(config["shapes"]) != SHAPES or tuple(config["colours"]) != COLOUR_NAMES:
        raise ValueError(f"judge at {folder} was trained on another world ({config})")
    judge = Judge()
    judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return judge.to(device).eval()
