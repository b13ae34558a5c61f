"""Benchmark the toy prior: judge accuracy, judged fidelity of DDIM samples per CFG, colour entropy, timing.

python benchmarks/toy_prior.py [--model toyworld|PATH] [--device cpu|cuda] [--samples-per-prompt 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pdray.imaging import save_png
from pdray.priors.diffusion import DiffusionPrior, resolve_model
from pdray.priors.sampling import image_grid, sample_images
from pdray.priors.toyworld.judge import colour_entropy, load_judge, max_colour_entropy
from pdray.priors.toyworld.world import ASYMMETRIC_SHAPES, COLOUR_NAMES, SHAPES, sample_world


def judge_accuracy(judge, device: str, n: int = 2048, seed: int = 1234) -> dict[str, float]:
    batch = sample_world(n, torch.Generator().manual_seed(seed), device=device)
    with torch.no_grad():
        shape, colour, view = judge(batch.images)
    asym = torch.tensor([SHAPES[i] in ASYMMETRIC_SHAPES for i in batch.shapes.tolist()], device=device)
    return {
        "shape": float((shape.argmax(-1) == batch.shapes).float().mean()),
        "colour": float((colour.argmax(-1) == batch.colours).float().mean()),
        "view_asymmetric": float((view.argmax(-1) == batch.views)[asym].float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples-per-prompt", type=int, default=32)
    parser.add_argument("--cfgs", default="1,3,7.5,15")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/toy_prior")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = DiffusionPrior(args.model, device=args.device, dtype=torch.float32)
    judge = load_judge(Path(resolve_model(args.model)[0]) / "judge", args.device)
    report: dict = {"model": args.model, "device": args.device, "judge_accuracy": judge_accuracy(judge, args.device)}
    print("judge accuracy on fresh renders:", report["judge_accuracy"], flush=True)

    started = time.time()
    sample_images(prior, ["a red cube"] * 8, steps=args.steps, cfg=7.5, progress=False)
    report["seconds_for_grid_of_8"] = time.time() - started
    print(f"grid of 8, DDIM {args.steps} steps: {report['seconds_for_grid_of_8']:.2f} s", flush=True)

    k = args.samples_per_prompt
    closed = [f"a {c} {s}" for s in SHAPES for c in COLOUR_NAMES]
    open_prompts = [f"a {s}" for s in SHAPES]
    report["cfg"] = {}
    for cfg in [float(c) for c in args.cfgs.split(",")]:
        prompts = [p for p in closed for _ in range(k)] + [p for p in open_prompts for _ in range(k)]
        started = time.time()
        images = sample_images(
            prior, prompts, steps=args.steps, cfg=cfg, seed=int(cfg * 10), batch_size=512, progress=False
        ).to(args.device)
        closed_images, open_images = images[: len(closed) * k], images[len(closed) * k :]
        agree = torch.cat([judge.agreement(closed_images[i * k : (i + 1) * k], p) for i, p in enumerate(closed)])
        entropies, shape_ok = [], []
        for i, p in enumerate(open_prompts):
            chunk = open_images[i * k : (i + 1) * k]
            entropies.append(colour_entropy(judge.classify(chunk)["colour"]) / max_colour_entropy())
            shape_ok.append(float(judge.agreement(chunk, p).mean()))
        report["cfg"][str(cfg)] = {
            "colour_shape_agreement": float(agree.mean()),
            "colour_open_shape_agreement": sum(shape_ok) / len(shape_ok),
            "colour_open_entropy_fraction": sum(entropies) / len(entropies),
            "seconds": time.time() - started,
        }
        print(f"cfg {cfg}: {report['cfg'][str(cfg)]}", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))  # kept current if a later CFG is cut off
        grid = image_grid(closed_images[:: k // 2 if k >= 2 else 1][:96].cpu(), columns=12)
        save_png(grid, out / f"samples_cfg{cfg}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
