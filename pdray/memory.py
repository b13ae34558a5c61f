"""Peak memory of the current process (host RSS high-water mark and CUDA allocator peak), for executor reports."""

from __future__ import annotations

import os
import resource

import torch


def peak_memory() -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"pid": os.getpid(), "peak_rss_mb": rss_kb / 1024, "peak_cuda_mb": cuda}
