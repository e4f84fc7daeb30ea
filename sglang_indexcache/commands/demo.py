"""Training-free IndexCache on the embedded model, end to end, on the CPU (``make demo``).

1. Pattern semantics in two lines: what ``every 4`` means and what an engine's ``index_topk_freq=4``
   really selects.
2. Greedy calibration of the embedded model (tiny-glm-dsa) at keep 1/4 on its bundled calibration
   text (exact search with prefix reuse), written to OUT/pattern.json + its loss plot.
3. LM loss on the held-out evaluation text: all-F, uniform every-4 and the calibrated pattern.
4. The cross-layer overlap heatmap (OUT/overlap.png) and the SGLang launch flags.

OUT is --out (default out/demo under the working directory). Token budgets are chosen so the whole
demo stays under 3 minutes on 2 idle CPU cores (94 s on 2026-12-02). Ctrl-C prints one line; the same
command again resumes the search from its last step, and a finished search (same model, data and
keep ratio) is reused rather than run again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .. import pattern as pat
from ..configs import NAMED, TINY_MODEL_DIR
from ..errors import Interrupted

DEFAULT_OUT = "out/demo"
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
    from .. import pattern_file
    from ..errors import UsageError

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


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the pattern file, plots and overlap matrix (default: {DEFAULT_OUT},"
                             " under the working directory); a finished search there is reused")


def run(args) -> int:
    from .options import check_output

    out_dir = check_output("--out", args.out, "dir", resume=True, inputs=(TINY_MODEL_DIR,))
    if not getattr(args, "verbose", False):  # the demo's story, plus progress lines in a log
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("sglang_indexcache.progress").setLevel(logging.INFO)
    try:
        return _run(Path(out_dir))
    except KeyboardInterrupt:
        from ..calibration.paths import state_path

        saved = state_path(Path(out_dir) / "pattern.json")
        raise Interrupted(f"the same command again resumes the search saved in {_rel(saved)}"
                          if saved.is_file() else "") from None


def _run(out_dir: Path) -> int:
    from ..errors import ModelDirError

    show_semantics()
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise ModelDirError(f"the embedded model is missing ({TINY_MODEL_DIR}): nothing to calibrate")
    from ..analysis.overlap import adjacent_mean, overlap_matrix
    from ..atomic import atomic_write_text, staged_files
    from ..calibration.data import load_blocks
    from ..calibration.plots import plot_overlap
    from ..calibration.paths import plot_path, state_path
    from ..calibration.run import calibrate
    from ..calibration.session import load_backend
    from ..model_info import load_model_info
    from ..calibration.pattern_losses import evaluate, format_table

    started = time.monotonic()
    info = load_model_info(TINY_MODEL_DIR)
    backend = load_backend(TINY_MODEL_DIR)
    data = TINY_MODEL_DIR / "data"
    cal = load_blocks(data / "calibration.txt", backend.tokenizer, SEQ_LEN, CAL_TOKENS)
    held_out = load_blocks(data / "evaluation.txt", backend.tokenizer, SEQ_LEN, EVAL_TOKENS)
    out = out_dir / "pattern.json"
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
    with staged_files(out_dir / "overlap.json", out_dir / "overlap.png") as (matrix_file, plot_file):
        atomic_write_text(matrix_file, json.dumps(overlap, indent=1) + "\n")  # both files, or neither
        plot_overlap(overlap["matrix"], plot_file, f"{TINY_MODEL_DIR.name}: top-k overlap")
    print(f"Mean adjacent-layer top-k overlap {adjacent_mean(overlap['matrix']):.3f} (paper, 30B model: 0.7-1.0)")
    print(f"Plots: {_rel(plot_path(out))}, {_rel(out_dir / 'overlap.png')}\n")
    model = _rel(TINY_MODEL_DIR)
    print("Serve the calibrated pattern with SGLang:")
    print(f"  patched: indexcache serve --model {TINY_MODEL_DIR.name} --pattern-file {_rel(out)}")
    print(f"  stock:   python -m sglang.launch_server --model-path {model} {pat.export(document['pattern'], 'sglang')}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0

