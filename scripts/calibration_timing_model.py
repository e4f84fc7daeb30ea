#!/usr/bin/env python3
"""The cost model of the greedy search through a server (issue 23), and the docs/perf.md section.

CPU only: reads the raw JSON that the live runner's ``issue23`` plan returns from the GPU host
(``calibration_timing.json``, written by ``scripts/live/calsearch.py``) and prints the Markdown section
of docs/perf.md with every number derived from it, and the model's assumptions beside them::

    python3 scripts/calibration_timing_model.py RESULTS.json [--tp-efficiency 0.6]

The model (one place, used by the report and the tests):
- the search's work: ``1 + sum(candidates per step) + 1`` whole-model evaluations (the all-F
  baseline, every step's candidates, the uniform pattern), :func:`search_shape`;
- one evaluation through the server = a fixed part (pattern switch, HTTP, log-prob transfer and
  parsing: measured, independent of the model's size) + the forward (measured on the stack);
- the forward scales with the prefill FLOPs of the layers and the LM head
  (``bench.shapes.prefill_counts`` per layer, ``2 * hidden * vocab`` per token for the head) at
  the rate the stack reached, divided by ``tp * tp_efficiency`` for a tensor-parallel model;
- prefix reuse inside the server (not built, docs/sglang.md) would run only the layers from the
  first changed one: its layer-forward ratio comes from :func:`prefix_reuse`, the project's real
  :class:`~sglang_indexcache.calibration.evaluators.PrefixEvaluator` on a counting backend.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sglang_indexcache import pattern as pat
from sglang_indexcache.bench.shapes import layer_shapes, prefill_counts
from sglang_indexcache.calibration import greedy
from sglang_indexcache.checkpoint_writer import checkpoint_config
from sglang_indexcache.configs import GLM_5


def search_shape(layers: int, keep: float) -> dict:
    """Steps, candidates per step and whole-model evaluations of the greedy search (no screening)."""
    target = greedy.target_full(layers, keep)
    candidates = [full - 1 for full in range(layers, target, -1)]
    return {"layers": layers, "keep": keep, "target_full": target, "steps": len(candidates),
            "candidates": sum(candidates), "evaluations": 1 + sum(candidates) + 1}


@dataclass
class _State:
    hidden: torch.Tensor
    shared: tuple


class _CountingBackend:
    """Layer-wise API whose loss is additive in the S layers (a random cost per layer): the greedy
    then removes layers in a random order, and the evaluator's layer-forward count is what we want."""

    def __init__(self, layers: int, seed: int):
        rng = random.Random(seed)
        self.num_layers, self.start_pattern, self.pattern = layers, pat.FULL * layers, pat.FULL * layers
        self.cost = [0.0] + [rng.random() for _ in range(layers - 1)]

    def begin(self, ids):
        return _State(torch.zeros(1), ())

    def layer(self, i, state, full):
        return state if full else replace(state, shared=state.shared + (i,))

    def end(self, state, ids):
        return 1.0 + sum(self.cost[i] for i in state.shared), 1


def prefix_reuse(layers: int, keep: float, seeds=(0, 1, 2)) -> dict:
    """Layer-forwards of the exact prefix-reuse search over those of whole forwards (one batch)."""
    ratios = []
    for seed in seeds:
        backend = _CountingBackend(layers, seed)
        evaluator = greedy.make_evaluator(backend, [torch.zeros(1, 1)])
        state = greedy.new_state(keep, {}, start_pattern=backend.start_pattern)
        greedy.run_search(evaluator, state, greedy.target_full(layers, keep), 1)
        ratios.append(state["layer_forwards"] / state["naive_layer_forwards"])
    return {"mean": statistics.mean(ratios), "min": min(ratios), "max": max(ratios), "seeds": len(seeds)}


def flops_per_evaluation(config: dict, seq_len: int, tokens: int) -> dict:
    """Prefill FLOPs of one evaluation (``tokens`` in blocks of ``seq_len``): layers and LM head."""
    per_block = sum(c["flops"] for c in prefill_counts(layer_shapes(config), seq_len).values())
    blocks = tokens // seq_len
    layers = per_block * blocks * int(config["num_hidden_layers"])
    head = 2.0 * int(config["hidden_size"]) * int(config["vocab_size"]) * blocks * seq_len
    return {"layers": layers, "head": head, "total": layers + head}


def run_summary(run: dict) -> dict:
    """Seconds per candidate evaluation and their split, from one ``search`` record of the phase.

    A run stopped before its first candidate gives the all-F baseline's time (one whole
    evaluation too, with one indexer more than any candidate)."""
    seconds = [r[3] for r in run["candidates"].values()] or ([run["reset_s"]] if run.get("reset_s") else [])
    timings, n = run["server_timings"], max(1, len(seconds) + 1)  # + the baseline evaluation
    per_request = {k: timings[k] / max(1, timings["requests"]) for k in ("request_s", "server_s", "encode_s",
                                                                         "decode_s", "score_s")}
    requests_per_eval = timings["requests"] / n
    return {"evaluations": len(run["candidates"]), "mean_s": statistics.mean(seconds) if seconds else None,
            "median_s": statistics.median(seconds) if seconds else None,
            "switch_s": timings["switch_s"] / max(1, timings["switches"]),
            "server_s": per_request["server_s"] * requests_per_eval,
            "transport_s": (per_request["request_s"] - per_request["server_s"]) * requests_per_eval,
            "client_s": (per_request["encode_s"] + per_request["decode_s"] + per_request["score_s"])
            * requests_per_eval, "requests_per_evaluation": requests_per_eval}


def extrapolate(results: dict, tp: int = 8, tp_efficiency: float = 0.6) -> dict:
    """Whole keep ratio search on the stack and on GLM-5 (TP ``tp``) from the measured evaluations."""
    setup = results["setup"]
    shape = search_shape(setup["layers"], setup["keep"])
    plain, fast = run_summary(results["runs"]["plain"]), run_summary(results["runs"]["in_flight"])
    stack = checkpoint_config(setup["hidden"], setup["layers"], setup["hidden"] * 11 // 4)
    forward_s = results["probes"]["forward_only_s"] * setup["tokens"] / results["probes"]["tokens"]
    stack_flops = flops_per_evaluation(stack, setup["seq_len"], setup["tokens"])
    rate = stack_flops["total"] / forward_s
    glm5 = flops_per_evaluation(dict(GLM_5, num_hidden_layers=setup["layers"]), setup["seq_len"], setup["tokens"])
    glm5_forward = glm5["total"] / (rate * tp * tp_efficiency)
    reuse = prefix_reuse(setup["layers"], setup["keep"])
    capture = (results.get("capture") or {}).get("seconds")
    forwards = setup["tokens"] / (setup["seq_len"] * setup["batch_size"])  # forwards per evaluation
    out = {"search": shape, "plain": plain, "in_flight": fast, "forward_s": forward_s, "rate_flops": rate,
           "prefix_reuse": reuse, "tp": tp, "tp_efficiency": tp_efficiency,
           "flops": {"stack": stack_flops, "glm5": glm5}}
    out["capture_s"] = capture
    if capture is not None:
        out["stack_capture_s"] = shape["evaluations"] * (plain["mean_s"] + forwards * capture)
    for name, summary in (("plain", plain), ("in_flight", fast)):
        fixed = summary["mean_s"] - forward_s
        out[f"stack_{name}_s"] = shape["evaluations"] * summary["mean_s"]
        out[f"glm5_{name}_s"] = shape["evaluations"] * (fixed + glm5_forward)
        # prefix reuse: the layers' share of the forward scaled by the ratio, the head always runs
        layers_share = lambda f: f["layers"] / f["total"]  # noqa: E731
        out[f"stack_{name}_prefix_s"] = shape["evaluations"] * (
            fixed + forward_s * (1 - layers_share(stack_flops) * (1 - reuse["mean"])))
        out[f"glm5_{name}_prefix_s"] = shape["evaluations"] * (
            fixed + glm5_forward * (1 - layers_share(glm5) * (1 - reuse["mean"])))
    return out


def _h(seconds) -> str:
    return "–" if seconds is None else f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report(results: dict, tp_efficiency: float = 0.6) -> str:
    """The docs/perf.md section for one run of the timing phase."""
    x = extrapolate(results, tp_efficiency=tp_efficiency)
    setup, probes, capture = results["setup"], results["probes"], results.get("capture") or {}
    lines = [f"### Calibration through the server: measured {results.get('date', '?')}, {results.get('device', '?')}",
             "",
             f"`{results.get('command', 'python3 scripts/gpu_live.py --plan issue23 --out $OUT')}`;"
             f" {setup['layers']}-layer GLM-5-attention stack, hidden {setup['hidden']}, checkpoint"
             f" {setup['checkpoint']} served with `--load-format dummy`, keep {setup['keep']:g},"
             f" {setup['tokens']:,} calibration tokens ({setup['tokens'] // setup['seq_len']} blocks of"
             f" {setup['seq_len']}, {setup['batch_size']} per request); server start {setup.get('startup_s', '?')} s.",
             "", "| run | evaluations | s / evaluation (mean, median) | switch | in SGLang | HTTP + transfer | client parse |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("plain", "plain (`--in-flight 1`)"), ("in_flight", "`--in-flight 4`")):
        s = x[name]
        lines.append(f"| {label} | {s['evaluations']} | {s['mean_s']:.3f}, {s['median_s']:.3f} |"
                     f" {s['switch_s']:.3f} | {s['server_s']:.3f} | {s['transport_s']:.3f} | {s['client_s']:.3f} |")
    lines += ["", "Per evaluation: the switch, then the requests' time inside SGLang (the largest"
              " `meta_info.e2e_latency` of each reply), the rest of their round trips, and the client's JSON"
              " and NLL work, each summed over the evaluation's requests (with requests in flight they"
              " overlap, so the sum exceeds the wall time)."]
    lines += ["", f"Probes (one request of {probes['tokens']:,} tokens): forward only (no log-probs)"
              f" {probes['forward_only_s']:.3f} s in SGLang, with prompt log-probs {probes['logprob_s']:.3f} s;"
              f" pattern switch {probes['switch_s']:.3f} s.",
              f"Top-k capture (`--enable-return-indexer-topk`, on in calibration mode before this change):"
              f" {capture.get('seconds', float('nan')):.3f} s per forward of {capture.get('tokens', '?')} tokens"
              " (device-to-host copy and host scatter of every layer's top-k, as SGLang's capturer does).",
              "", f"Extrapolation (model in `scripts/calibration_timing_model.py`): {x['search']['evaluations']:,}"
              f" evaluations for keep {setup['keep']:g} of {setup['layers']} layers; forward"
              f" {x['forward_s']:.3f} s per evaluation ({x['rate_flops'] / 1e12:.0f} TFLOP/s reached);"
              f" GLM-5 at TP {x['tp']} assumed at {x['tp_efficiency']:.0%} of 8x that rate; in-server prefix"
              f" reuse runs {x['prefix_reuse']['mean']:.2f}x the layer-forwards (simulated, not built).", "",
              "| search | stack (measured rate) | GLM-5, TP 8 (model) |", "|---|---|---|"]
    if x.get("capture_s") is not None:
        lines.append(f"| plain with the top-k capture on (before this change) | {_h(x['stack_capture_s'])} | – |")
    for name, label in (("plain", "plain"), ("in_flight", "requests in flight")):
        lines.append(f"| {label} | {_h(x[f'stack_{name}_s'])} | {_h(x[f'glm5_{name}_s'])} |")
        lines.append(f"| {label} + prefix reuse in the server | {_h(x[f'stack_{name}_prefix_s'])} |"
                     f" {_h(x[f'glm5_{name}_prefix_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="calibration_timing.json of the timing phase")
    parser.add_argument("--tp-efficiency", type=float, default=0.6, help="share of 8x the stack's rate (0.6)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as exc:
        print(f"calibration_timing_model: error: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(report(results, args.tp_efficiency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
