"""How well the toy prior itself binds the view suffix, with and without view guidance: the cause of views lost in 3D.

    python benchmarks/view_binding.py [--prompts "a house;a chair;a mug"] [--scales 0,3,7.5,15] [--per-view 16]

For each prompt and ``prior.view_guidance`` scale, DDIM 50 samples at CFG 7.5 of "PROMPT, front view" / "side view" /
"back view" (``--per-view`` each, the same noise for every scale) are read by the toy judge: the fraction whose view
is the one asked for (the world's own renders: 1.0), the fraction of the prompt's shape, the foreground brightness,
and the confusion (asked -> read). A distillation can hardly bind views better than the score it follows does.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from pdray.evaluation.metrics import foreground_brightness
from pdray.priors.diffusion import TOY_MODEL_DIR, DiffusionPrior
from pdray.priors.sampling import sample_images
from pdray.priors.toyworld.captions import parse_prompt
from pdray.priors.toyworld.judge import load_judge
from pdray.priors.toyworld.world import VIEWS
from pdray.prompts import view_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="a house;a chair;a mug", help="';'-separated")
    parser.add_argument("--scales", default="0,3,7.5,15", help="view_guidance scales, ','-separated")
    parser.add_argument("--per-view", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    prior = DiffusionPrior("toyworld", device="cpu")
    judge = load_judge(TOY_MODEL_DIR / "judge")
    print(f"{'prompt':<10}{'view_guidance':>14}{'views right':>12}{'shape':>7}{'value':>7}  confusion (asked->read: n)")
    for prompt in args.prompts.split(";"):
        asked = [v for v in VIEWS for _ in range(args.per_view)]
        prompts = [view_prompt(prompt, v) for v in asked]
        for scale in (float(s) for s in args.scales.split(",")):
            images = sample_images(
                prior,
                prompts,
                cfg=7.5,
                seed=3000,
                progress=False,
                plain_prompts=[prompt] * len(asked),
                view_guidance=scale,
            )
            read = judge.classify(images)
            right = sum(r == a for r, a in zip(read["view"], asked, strict=True)) / len(asked)
            shape = sum(s == parse_prompt(prompt).shape for s in read["shape"]) / len(asked)
            wrong = Counter(f"{a}->{r}" for a, r in zip(asked, read["view"], strict=True) if a != r)
            confusion = " ".join(f"{k}: {n}" for k, n in wrong.most_common())
            value = foreground_brightness(images)
            print(f"{prompt:<10}{scale:>14g}{right:>12.2f}{shape:>7.2f}{value:>7.3f}  {confusion}", flush=True)


if __name__ == "__main__":
    main()
