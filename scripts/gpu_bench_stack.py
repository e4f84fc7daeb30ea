"""One GPU session of the layer-stack benchmark (called by gpu_bench_stack.sh): a kernel check,
then prefill and decode suites under a wall-clock budget, each suite's document saved as it grows.

Usage: python3 scripts/gpu_bench_stack.py OUT_DIR [BUDGET_SECONDS] [--smoke]
``--smoke`` runs the same code at toy sizes (CPU, TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from sglang_indexcache import pattern as pat
from sglang_indexcache.bench import report, runner
from sglang_indexcache.bench.ops import KernelSet
from sglang_indexcache.configs import named_config
from sglang_indexcache.atomic import atomic_write_text

log = logging.getLogger("gpu_bench_stack")
K = 1024

# (file stem, mode, config, layers, contexts, batches, patterns, repeats, warmup, share of budget);
# the headline context first, so that a tight budget cuts the small ones
SUITES = [
    ("prefill_glm-30b-a3b", "prefill", "glm-30b-a3b", 4, [128 * K, 8 * K, 32 * K, 64 * K], [1],
     ["every-2", "every-4"], 3, 1, 0.30),
    ("prefill_deepseek-v3.2", "prefill", "deepseek-v3.2", 4, [128 * K, 8 * K, 32 * K, 64 * K], [1],
     ["every-2", "every-4"], 3, 1, 0.30),
    ("decode_glm-30b-a3b", "decode", "glm-30b-a3b", 4, [200 * K], [1, 8, 32, 64], ["every-4"], 10, 3, 0.12),
    ("decode_deepseek-v3.2", "decode", "deepseek-v3.2", 4, [200 * K], [1, 8], ["every-4"], 10, 3, 0.12),
    ("prefill200k_glm-30b-a3b", "prefill", "glm-30b-a3b", 4, [200 * K], [1], ["every-4"], 2, 1, 0.16),
]
SMOKE = {"glm-30b-a3b": dict(hidden_size=64, q_lora_rank=32, num_attention_heads=2, index_n_heads=2,
                             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             index_topk=32, kv_lora_rank=32, qk_rope_head_dim=16)}


def check_kernels(device, dtype, out: Path, smoke: bool) -> dict:
    """Triton kernels against the references' math on one random prefill (same inputs)."""
    t, h, d, hq, d_qk = (256, 2, 32, 2, 48) if smoke else (4096, 32, 128, 20, 576)
    topk = 32 if smoke else 2048
    tri, ref = KernelSet("triton", device), KernelSet("torch", device)
    q, w, k = (torch.randn(t, h, d, device=device).to(dtype), torch.rand(t, h, device=device),
               torch.randn(t, d, device=device).to(dtype))
    got, want = tri.indexer_prefill(q, w, k, topk, 0.1), ref.indexer_prefill(q.float(), w, k.float(), topk, 0.1)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(got[-64:].tolist(), want[-64:].tolist())) / (64 * topk)
    cache = torch.randn(t // 64, 64, d_qk, device=device).to(dtype)
    page_row = torch.arange(t // 64, dtype=torch.int32, device=device)
    qa = torch.randn(64, hq, d_qk, device=device).to(dtype)
    o1 = tri.attention_prefill(qa, cache, page_row, want[-64:], 0.05, d_qk - 16 if smoke else 512).float()
    o2 = ref.attention_prefill(qa.float(), cache.float(), page_row, want[-64:], 0.05,
                               d_qk - 16 if smoke else 512)
    result = {"indexer_topk_overlap_last64": overlap,
              "attention_rel_err": ((o1 - o2).norm() / o2.norm()).item(), "kernels": tri.describe()}
    atomic_write_text(out / "kernel_check.json", json.dumps(result, indent=1) + "\n")
    log.info("kernel check: %s", result)
    return result


def main(argv) -> int:
    out = Path(argv[0])
    budget = float(argv[1]) if len(argv) > 1 and not argv[1].startswith("-") else 250.0
    smoke = "--smoke" in argv
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cpu" if smoke else "cuda")
    start = time.monotonic()
    try:
        check_kernels(device, torch.bfloat16, out, smoke)
    except Exception:  # report and go on: the suites still measure with what runs
        log.exception("kernel check failed")
    summary = []
    for stem, mode, name, layers, contexts, batches, patterns, repeats, warmup, share in SUITES:
        config = named_config(name)
        if smoke:
            config.update(SMOKE.get(name, SMOKE["glm-30b-a3b"]))
            contexts, batches, repeats = [c // 256 for c in contexts], batches[:2], 1
        deadline = time.monotonic() + share * budget
        if time.monotonic() - start > budget:
            log.warning("budget spent: skipping %s", stem)
            continue
        spec = runner.BenchSpec(
            mode=mode, config_name=name, config=config, layers=layers, contexts=contexts,
            patterns=[("all-F", pat.all_full(layers))] + [(p, runner_pattern(p, layers)) for p in patterns],
            device=device, dtype=torch.bfloat16, kernels="triton",
            batches=batches, repeats=repeats, warmup=warmup, chunk=16 * K if not smoke else 64,
            deadline=deadline)
        path = out / f"{stem}.json"
        save = lambda doc, path=path: atomic_write_text(path, json.dumps(doc, indent=1) + "\n")  # noqa: E731
        t0 = time.monotonic()
        try:
            doc = (runner.run_prefill if mode == "prefill" else runner.run_decode)(spec, on_rows=save)
        except Exception:
            log.exception("%s failed", stem)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        text = f"## {stem} ({time.monotonic() - t0:.0f} s)\n{report.header(doc)}\n{report.table(doc)}\n"
        summary.append(text)
        print(text, flush=True)
    atomic_write_text(out / "summary.md", "\n".join(summary))
    return 0


def runner_pattern(spec: str, layers: int) -> str:
    from sglang_indexcache.pattern_file import resolve

    return resolve(spec, layers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
