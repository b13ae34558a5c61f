"""The weak-scaling projection of benchmarks/gpu_step.py from ESTIMATED one-GPU component times, for a session without
a GPU: the R=G all-reduce cost and the break-even step time follow from the LoRA's size alone; the table needs a
step time and its split, which are assumptions stated below. Replace them with gpu_step.py's measured table.

    python benchmarks/scaling_estimate.py
"""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_step", Path(__file__).with_name("gpu_step.py"))
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
S = 2491392 * 4  # SD 2.1 LoRA (rank 4, to_q/k/v/out.0) + camera MLP, float32 gradient bytes (benchmarks/sd_memory.py)
L = 4 * 4 * 64 * 64
B, P, a = 5e9, 25e9, 2e-3  # gpu_step.py's defaults: object-store GB/s, PCIe GB/s, seconds per round of calls
for G in (8, 16, 64):
    c = g.allreduce_seconds(G, S, B, P, a)
    print(
        f"R=G all-reduce at {G} GPUs: {1000 * c:.1f} ms; efficiency >= 0.90 needs a one-GPU step >= {9000 * c:.0f} ms"
    )
# One assumed step of 0.46 s per particle (the premise: ~9 h for the paper's 25k + 15k + 30k steps on one GPU),
# split as the toy CPU step splits (score side 0.11 s : particle side 0.06 s per particle, ScoreActor 65%).
step = 0.46
score, particle = step * 0.11 / 0.17, step * 0.06 / 0.17
seconds = {
    "render": particle * 0.4,
    "encode": particle * 0.1,
    "unet_cfg": score * 0.5,
    "unet_lora": score * 0.2,
    "lora_update": score * 0.3,
    "backward": particle * 0.5,
}
rows = g.project([{"particles": 1, "seconds": seconds}], S, L, B, a, P)
print("assumed one-GPU step at p=1:", {k: round(v, 3) for k, v in seconds.items()}, "total", step)
print("| GPUs | R | particles | step s | efficiency |")
for r in rows:
    print(f"| {r['gpus']} | {r['replicas']} | {r['particles']} | {r['step_s']:.3f} | {r['efficiency']:.3f} |")
