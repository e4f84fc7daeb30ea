"""``make demo``: training-free IndexCache on the embedded model, end to end, on the CPU.

1. Pattern semantics in two lines: what ``every 4`` means and what an engine's ``index_topk_freq=4``
   really selects.
2. Greedy calibration of ``models/tiny-glm-dsa`` at keep 1/4 on its bundled calibration text
   (exact search with prefix reuse), written to ``out/demo/pattern.json`` + its loss plot.
3. LM loss on the held-out evaluation text: all-F, uniform every-4 and the calibrated pattern.
4. The cross-layer overlap heatmap (``out/demo/overlap.png``) and the SGLang launch flags.

Token budgets are chosen so the whole demo stays under 3 minutes on 2 idle CPU cores (94 s on
2026-12-02; on a busy machine torch gets one thread, which is faster there). Ctrl-C prints one line; the next run resumes the search from its last step, and a
finished search (same model, data and keep ratio) is reused rather than run again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from . import pattern as pat
from .configs import NAMED, REPO_ROOT, TINY_MODEL_DIR

OUT_DIR = REPO_ROOT / "out" / "demo"
KEEP = 0.25
SEQ_LEN = 1024
CAL_TOKENS = 8 * 1024
EVAL_TOKENS = 16 * 1024
OVERLAP_TOKENS = 4 * 1024
BATCH = 4


def show_semantics() -> None:
    glm5 = NAMED["glm-5"]["num_hidden_layers"]
    print(f"Pattern semantics (GLM-5, {glm5} DSA layers): every-4 = {pat.uniform(glm5, 4)[:16]}..., while"
          f" SGLang's index_topk_freq=4 selects {pat.from_engine_freq('sglang', glm5, 4)[:16]}...")
    print("  so we always hand engines an explicit pattern.\n")


def _rel(path) -> str:
    """A path relative to the working directory when it lies below it (shorter to read and copy)."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _earlier_result(out, info, cal) -> dict | None:
    """The pattern file of an earlier finished demo search with the same model, data and keep."""
    from . import pattern_file
    from .errors import UsageError

    if not out.is_file():
        return None
    try:
        document = pattern_file.read(out)
        pattern_file.check_matches(document, info)
    except UsageError:
        return None
    c = document.get("calibration") or {}
    same = c.get("data") == cal.describe() and c.get("keep_ratio") == KEEP and c.get("batch_size") == BATCH
    return document if same and c.get("method") == "greedy" else None


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sglang_indexcache.progress").setLevel(logging.INFO)  # progress lines in a log
    from .errors import UsageError

    try:
        return run()
    except KeyboardInterrupt:
        print(f"\ndemo interrupted; `make demo` again resumes the search saved in {_rel(OUT_DIR)}", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2


def run() -> int:
    show_semantics()
    if not (TINY_MODEL_DIR / "config.json").is_file():
        print(f"the embedded model is missing ({TINY_MODEL_DIR}): nothing to calibrate", file=sys.stderr)
        return 1
    from .analysis.overlap import adjacent_mean, overlap_matrix
    from .calibration.data import load_blocks
    from .calibration.plots import plot_overlap
    from .calibration.run import calibrate, plot_path, state_path
    from .calibration.session import load_backend
    from .commands.eval_cmd import evaluate, format_table
    from .model_info import load_model_info

    started = time.monotonic()
    info = load_model_info(TINY_MODEL_DIR)
    backend = load_backend(TINY_MODEL_DIR)
    data = TINY_MODEL_DIR / "data"
    cal = load_blocks(data / "calibration.txt", backend.tokenizer, SEQ_LEN, CAL_TOKENS)
    held_out = load_blocks(data / "evaluation.txt", backend.tokenizer, SEQ_LEN, EVAL_TOKENS)
    out = OUT_DIR / "pattern.json"
    print(f"Greedy calibration of {TINY_MODEL_DIR.name} ({backend.num_layers} DSA layers) at keep {KEEP:g}"
          f" on {cal.tokens} tokens of calibration.txt ...")
    document = _earlier_result(out, info, cal)
    if document is None:
        document = calibrate(backend, cal, info, KEEP, out, resume=state_path(out).exists(), batch_size=BATCH)
    else:
        print(f"  (the finished search of an earlier run, {_rel(out)}; delete it to search again)")
    c = document["calibration"]
    print(f"  {document['pattern']}: calibration loss {c['baseline_loss']:.4f} -> {c['loss']:.4f};"
          f" {c['layer_forwards']} layer-forwards (naive search {c['naive_layer_forwards']}), {c['seconds']:.0f} s\n")
    specs = ["all-F", "every-4", str(out)]
    results = evaluate(backend, held_out, specs, info, BATCH)
    print(f"Held-out LM loss on {held_out.tokens} tokens of evaluation.txt (nats/token):")
    print(format_table(results) + "\n")
    overlap = overlap_matrix(backend, list(load_blocks(data / "evaluation.txt", backend.tokenizer, SEQ_LEN,
                                                       OVERLAP_TOKENS).batches(BATCH)))
    (OUT_DIR / "overlap.json").write_text(json.dumps(overlap, indent=1) + "\n")
    plot_overlap(overlap["matrix"], OUT_DIR / "overlap.png", f"{TINY_MODEL_DIR.name}: top-k overlap")
    print(f"Mean adjacent-layer top-k overlap {adjacent_mean(overlap['matrix']):.3f} (paper, 30B model: 0.7-1.0)")
    print(f"Plots: {_rel(plot_path(out))}, {_rel(OUT_DIR / 'overlap.png')}\n")
    model = _rel(TINY_MODEL_DIR)
    print("Serve the calibrated pattern with SGLang:")
    print(f"  patched: python -m sglang.launch_server --model-path {model} --index-cache-pattern-file {_rel(out)}")
    print(f"  stock:   python -m sglang.launch_server --model-path {model} {pat.export(document['pattern'], 'sglang')}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
