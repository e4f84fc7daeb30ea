#!/usr/bin/env python3
"""The cost per forward of SGLang's indexer top-k capture (``--enable-return-indexer-topk``).

    python3 scripts/topk_capture_bench.py TOKENS LAYERS [TOPK 2048] [REPEATS 3]

SGLang 0.5.17's ``BaseTopkCapturer`` (``state_capturer/base.py``), synchronous path: the forward's
device slice ``[tokens, layers, topk]`` int32 copied to the host, then scattered into the pinned host
cache at the requests' KV locations. Prints one JSON line: the sizes, the device, every repeat's
seconds and their median. On a machine without CUDA it runs the same lines on the CPU (the live
runner's CPU test). Run by the ``topk-capture`` phase of the live runner's ``issue23`` plan.
"""

from __future__ import annotations

import json
import sys
import time


def measure(tokens: int, layers: int, topk: int = 2048, repeats: int = 3) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.zeros((tokens, layers, topk), dtype=torch.int32, device="cuda" if cuda else "cpu")
    host = torch.zeros((tokens + 1024, layers, topk), dtype=torch.int32, pin_memory=cuda)
    loc = torch.randperm(tokens + 1024, device=device.device)[:tokens]
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        host[loc.cpu()] = device.cpu()
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "layers": layers, "topk": topk, "gib": device.numel() * 4 / 2**30,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "times": times,
            "seconds": sorted(times)[len(times) // 2]}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        sizes = [int(a) for a in args]
        if not 2 <= len(sizes) <= 4 or min(sizes) <= 0:
            raise ValueError
    except ValueError:
        print("topk_capture_bench: error: expected TOKENS LAYERS [TOPK] [REPEATS], positive integers", file=sys.stderr)
        return 2
    print(json.dumps(measure(*sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
