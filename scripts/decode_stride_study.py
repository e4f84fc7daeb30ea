"""Decode-stride top-k reuse on the embedded model: the quality study of issue 22 (part 1), one process.

``python scripts/decode_stride_study.py --out-prefix docs/results/decode-stride-cpu-DATE --threads 1``
(a research script, not part of the package). Every loss is teacher-forced (``models/decode_reuse.py``),
total nats over total predicted tokens, on the same held-out blocks:

1. ``uniform``: each pattern (all-F, every-4, greedy keep 1/4, greedy keep 1/8) at every F layer's
   decode stride 1, 2, 4, 8;
2. ``sensitivity``: stride 4 on one F layer at a time (the rest at 1), over all-F and over greedy 1/4,
   through the search's exact prefix-reuse evaluator (candidate j runs layers j..N-1 only);
3. ``search``: per-layer strides chosen by the greedy search (``calibrate --stride-target``) on the
   calibration text, over greedy 1/4 (and all-F with ``--search-all-f``), then scored held-out;
4. the gate of the issue: stride 4 on greedy 1/4 against greedy 1/8 (both over all-F at stride 1);
5. ``drop``: some settings of 1. again with the stored entries dropped in a random order instead of
   the lowest-scored first (``--drop-keys``): does a server need the scores of its stored top-k?

Every measurement is written to ``PREFIX.json`` as soon as it is taken; a rerun skips what is there
(same model and data), so an interrupted study loses at most one measurement. ``PREFIX.png`` is the
plot; the searches write their pattern files ``PREFIX-search-<base>.json`` (+ .calibration.png).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from sglang_indexcache import pattern as pat
from sglang_indexcache import pattern_file
from sglang_indexcache.atomic import atomic_write_json
from sglang_indexcache.configs import TINY_MODEL_DIR

log = logging.getLogger("decode_stride_study")
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
FILE_LABELS = {"greedy-1/4": "greedy-keep0.25", "greedy-1/8": "greedy-keep0.125"}
GREEDY = {"greedy-1/4": RESULTS / "quality-cpu-2026-11-23-greedy-keep0.25.json",
          "greedy-1/8": RESULTS / "quality-cpu-2026-11-23-greedy-keep0.125.json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.relpath(TINY_MODEL_DIR),
                   help="default: the embedded model (relative paths keep the results free of this machine's)")
    p.add_argument("--eval-data", default=None, help="default: MODEL/data/evaluation.txt")
    p.add_argument("--cal-data", default=None, help="default: MODEL/data/calibration.txt")
    p.add_argument("--eval-tokens", type=int, default=1_000_000)
    p.add_argument("--cal-tokens", type=int, default=32768)
    p.add_argument("--cal-tokens-all-f", type=int, default=8192, help="calibration tokens of the all-F search")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--strides", default="1,2,4,8")
    p.add_argument("--patterns", default="all-F,every-4,greedy-1/4,greedy-1/8",
                   help="labels; greedy-1/4 and greedy-1/8 are the pattern files in docs/results, else a spec")
    p.add_argument("--target", type=float, default=4.0, help="effective stride of the searches")
    p.add_argument("--search-all-f", action="store_true", help="also search strides over all-F")
    p.add_argument("--drop-keys", default="greedy-1/4@2,greedy-1/4@4,greedy-1/4@8,all-F@4",
                   help="uniform settings also scored with random drop order ('' for none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-prefix", required=True)
    return p.parse_args(argv)


class Study:
    """The results document, saved atomically after every measurement; ``have`` skips done ones."""

    def __init__(self, path: Path, identity: dict):
        self.path = path
        self.doc = json.loads(path.read_text()) if path.exists() else {}
        if self.doc and self.doc.get("identity") != identity:
            raise SystemExit(f"{path} was measured on another model or data; choose another --out-prefix")
        self.doc.setdefault("identity", identity)
        self.doc.setdefault("started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

    def have(self, section: str, key: str):
        return self.doc.get(section, {}).get(key)

    def put(self, section: str, key: str, value) -> None:
        self.doc.setdefault(section, {})[key] = value
        atomic_write_json(self.path, self.doc)


def spec_of(label: str) -> str:
    return str(GREEDY[label]) if label in GREEDY else label


def held_out(backend, blocks, batch_size, pattern, strides, drop="lowest") -> dict:
    """Loss of ``blocks`` under ``pattern`` and per-layer ``strides`` (whole forwards)."""
    started = time.monotonic()
    backend.set_pattern(pattern)
    backend.set_decode_stride(strides)
    for ix in backend.indexers:
        if ix is not None:
            ix.decode_drop = drop
    try:
        result = backend.loss(blocks, batch_size)
    finally:
        backend.set_decode_stride(1)
        for ix in backend.indexers:
            if ix is not None:
                ix.decode_drop = "lowest"
    return {"pattern": pattern, "decode_stride": list(strides), "loss": result.mean, "tokens": result.tokens,
            "seconds": round(time.monotonic() - started, 1), "drop": drop}


def drop_section(study, backend, blocks, args, patterns, keys):
    for key in keys:
        label, stride = key.rsplit("@", 1)
        if label in patterns and study.have("drop_random", key) is None:
            row = held_out(backend, blocks, args.batch_size, patterns[label],
                           pat.uniform_strides(len(patterns[label]), int(stride)), drop="random")
            study.put("drop_random", key, row)
            log.info("%s, random drop: %.4f (%.0f s)", key, row["loss"], row["seconds"])


def uniform_section(study, backend, blocks, args, patterns, strides):
    for label, pattern in patterns.items():
        for stride in strides:
            key = f"{label}@{stride}"
            if study.have("uniform", key) is None:
                row = held_out(backend, blocks, args.batch_size, pattern, pat.uniform_strides(len(pattern), stride))
                study.put("uniform", key, row)
                log.info("%s: %.4f (%.0f s)", key, row["loss"], row["seconds"])


def sensitivity_section(study, backend, blocks, args, patterns):
    """Stride 4 on one F layer at a time, the others at 1, exact prefix reuse (one evaluator per base)."""
    from sglang_indexcache.calibration import greedy
    from sglang_indexcache.calibration.moves import StrideMoves

    batches = list(blocks.batches(args.batch_size))
    for label in ("all-F", "greedy-1/4"):
        if label not in patterns or study.have("sensitivity", label) is not None:
            continue
        started, pattern = time.monotonic(), patterns[label]
        backend.set_pattern(pattern)
        evaluator = greedy.make_evaluator(backend, batches, moves=StrideMoves(pattern, levels=(1, 4)))
        base = evaluator.reset(tuple([1] * len(pattern)), f"{label} at stride 1")
        layers = {str(j): evaluator.candidate(j, range(len(batches)), f"{label}, layer {j} at stride 4")[0]
                  for j in pat.full_layers(pattern)}
        study.put("sensitivity", label, {"pattern": pattern, "stride": 4, "base_loss": base, "loss": layers,
                                         "layer_forwards": evaluator.layer_forwards,
                                         "seconds": round(time.monotonic() - started, 1)})
        log.info("sensitivity %s: %s", label, {j: round(v, 4) for j, v in layers.items()})
        del evaluator


def search_section(study, backend, info, eval_blocks, args, prefix, label, cal_tokens):
    from sglang_indexcache.calibration.data import load_blocks
    from sglang_indexcache.calibration.paths import state_path
    from sglang_indexcache.calibration.stride_search import calibrate_stride

    if study.have("search", label) is not None:
        return
    cal = load_blocks(args.cal_data, backend.tokenizer, args.seq_len, cal_tokens)
    out = Path(f"{prefix}-search-{FILE_LABELS.get(label, label)}.json")
    document = calibrate_stride(backend, cal, info, spec_of(label), args.target, out, resume=state_path(out).exists(),
                                batch_size=args.batch_size)
    row = held_out(backend, eval_blocks, args.batch_size, document["pattern"], document["decode_stride"])
    calib = document["decode_stride_calibration"]
    study.put("search", label, {**row, "file": out.name, "effective_stride": calib["effective_stride"],
                                "calibration": {k: calib[k] for k in ("baseline_loss", "loss", "uniform", "steps",
                                                                      "layer_forwards", "naive_layer_forwards",
                                                                      "seconds", "data")}})
    log.info("search %s: %s -> held-out %.4f", label, document["decode_stride"], row["loss"])


def gate(doc: dict) -> dict | None:
    """Stride 4 on greedy 1/4 versus greedy 1/8, both as % over all-F at stride 1."""
    u = doc.get("uniform", {})
    keys = ("all-F@1", "greedy-1/4@1", "greedy-1/4@4", "greedy-1/8@1")
    if not all(k in u for k in keys):
        return None
    base = u["all-F@1"]["loss"]
    pct = {k: 100.0 * (u[k]["loss"] - base) / base for k in keys[1:]}
    return {"over_all_f_pct": pct, "stride4_cost_pct_points": pct["greedy-1/4@4"] - pct["greedy-1/4@1"],
            "keep_1_8_cost_pct_points": pct["greedy-1/8@1"] - pct["greedy-1/4@1"],
            "passes": pct["greedy-1/4@4"] < pct["greedy-1/8@1"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = Path(args.model)
    args.eval_data = args.eval_data or str(model / "data" / "evaluation.txt")
    args.cal_data = args.cal_data or str(model / "data" / "calibration.txt")
    from sglang_indexcache.calibration.data import load_blocks
    from sglang_indexcache.calibration.plots import plot_decode_stride_study
    from sglang_indexcache.calibration.session import load_backend
    from sglang_indexcache.model_info import load_model_info

    info = load_model_info(model)
    backend = load_backend(model, threads=args.threads)
    blocks = load_blocks(args.eval_data, backend.tokenizer, args.seq_len, args.eval_tokens)
    labels = args.patterns.split(",")
    patterns = {label: pattern_file.resolve(spec_of(label), info.num_dsa_layers, info) for label in labels}
    identity = {"model": info.fingerprint(), "eval": blocks.describe(), "seq_len": args.seq_len,
                "batch_size": args.batch_size, "patterns": patterns}
    prefix = Path(args.out_prefix)
    study = Study(prefix.with_name(prefix.name + ".json"), identity)
    uniform_section(study, backend, blocks, args, patterns, [int(s) for s in args.strides.split(",")])
    study.put("gate", "result", gate(study.doc))
    sensitivity_section(study, backend, blocks, args, patterns)
    if "greedy-1/4" in patterns:
        search_section(study, backend, info, blocks, args, prefix, "greedy-1/4", args.cal_tokens)
    if args.search_all_f and "all-F" in patterns:
        search_section(study, backend, info, blocks, args, prefix, "all-F", args.cal_tokens_all_f)
    drop_section(study, backend, blocks, args, patterns, [k for k in args.drop_keys.split(",") if k])
    study.put("finished", "at", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    plot_decode_stride_study(study.doc, prefix.with_name(prefix.name + ".png"))
    log.info("gate: %s", study.doc["gate"]["result"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
