"""Named queues of phases (``gpu_live.py --plan NAME[,NAME...]``), most valuable first.

A plan is a function returning phases (runner.Phase: a function, an estimate in device seconds, the
server it needs). ``build`` puts one ``setup`` phase in front that writes the checkpoints every
server of the chosen plans uses. To plug in another helper's GPU work, add a function here that
returns its phases and name it in ``PLANS``; a script that needs no server is one
``script_phase(name, argv, estimate_s)`` (``{out}`` in argv becomes the phase's output folder,
which is packed with the rest).
"""

from __future__ import annotations

import dataclasses
import subprocess
import time

from sglang_indexcache import pattern as pat

from . import calsearch, capacity, checks, host, measure, stride
from .runner import Phase

ALL_PARTS = ["prefill", "decode-8x200k", "chunk40k", "decode-32x32k"]


def issue21() -> list[Phase]:
    """The 32-layer stack in the GPU-bound regime, KV memory, saturation, chunked prefill, then more."""
    f32, e4, e8 = "F" * 32, pat.uniform(32, 4), pat.uniform(32, 8)
    stock_e4 = measure.bench_server("stock-e4", "stock", e4)
    patched_e4 = measure.bench_server("patched-e4", "patched", e4)
    fraction = capacity.fp8_fraction("stock-e4", "stock-e4-fp8", e4)
    stock_fp8 = measure.bench_server("stock-e4-fp8", "stock", e4, kv="fp8", batch=8, mem=None, resolve=fraction)
    patched_fp8 = measure.bench_server("patched-e4-fp8", "patched", e4, kv="fp8", batch=8, mem=None, resolve=fraction)
    reference = measure.calibration_server("chunk-ref-65536", 65536)
    chunked16 = measure.calibration_server("chunk-16384-calibration", 16384)
    e4_78 = pat.uniform(78, 4)
    deep = dict(checkpoint="l78-config", batch=8, extra=["--load-format", "dummy"], start_kind="deep")
    return [
        *measure.bench_phases(stock_e4, ALL_PARTS),
        *measure.bench_phases(patched_e4, ALL_PARTS),
        Phase("memory-bf16", capacity.memory_compare("stock-e4", "patched-e4", "bf16", e4), 1, gpu=False,
              needs=("stock-e4:prefill", "patched-e4:prefill")),
        Phase("stock-e4-fp8:saturation", capacity.saturation("stock"), 50, server=stock_fp8, kind="saturation-stock"),
        Phase("patched-e4-fp8:saturation", capacity.saturation("patched", "stock-e4-fp8:saturation"), 40,
              server=patched_fp8, needs=("stock-e4-fp8:saturation",), kind="saturation-patched"),
        Phase("memory-fp8", capacity.memory_compare("stock-e4-fp8", "patched-e4-fp8", "fp8", e4), 1, gpu=False,
              needs=("stock-e4-fp8:saturation", "patched-e4-fp8:saturation")),
        Phase("chunk-ref", measure.calibration_logprobs([f32, e4]), 15, server=reference),
        Phase("chunk-16384-calibration", measure.calibration_logprobs([f32, e4]), 12, server=chunked16),
        Phase("chunk-compare", measure.chunk_compare("chunk-ref"), 2, gpu=False, needs=("chunk-ref",)),
        *measure.bench_phases(measure.bench_server("stock-all-F", "stock", f32), ALL_PARTS),
        *measure.bench_phases(measure.bench_server("stock-e8", "stock", e8),
                              ["prefill", "decode-8x200k", "decode-32x32k"]),
        # a calibrated pattern file for the 32-layer checkpoint, where another phase or a commit put one
        *measure.bench_phases(dataclasses.replace(
            measure.bench_server("patched-calibrated", "patched", f32), pattern=None,
            resolve=measure.calibrated_file([host.REPO / "docs" / "results" / "calibrated-l32.json",
                                             host.CALIBRATED_L32])),
            ["prefill", "decode-8x200k"]),
        Phase("chunk-compare-final", measure.chunk_compare("chunk-ref"), 2, gpu=False, needs=("chunk-ref",)),
        *measure.bench_phases(measure.bench_server("stock-e4-l78", "stock", e4_78, **deep), ["prefill-deep"]),
        *measure.bench_phases(measure.bench_server("patched-e4-l78", "patched", e4_78, **deep), ["prefill-deep"]),
        Phase("memory-l78", capacity.memory_compare("stock-e4-l78", "patched-e4-l78", "bf16", e4_78), 1, gpu=False,
              needs=("stock-e4-l78:prefill-deep", "patched-e4-l78:prefill-deep")),
    ]


def issue22() -> list[Phase]:
    """Decode stride on the 32-layer stack: every-4 at strides 4/1/2/8/4 by run-time switch on one server
    (8 x 200K, then 31 x 32K, prefilled once each), stock all-F and every-4 without a stride beside (the
    1.6x target and stride 1), the top-k each layer used on the GPU, switches under load."""
    e4, f32 = pat.uniform(32, 4), "F" * 32
    server = stride.stride_server("i22-e4-stride4", e4, 4)
    sweep8 = "i22-e4-stride4:decode-8x200k-strides"
    all_f, no_stride = (measure.bench_server("i22-stock-all-F", "stock", f32),
                        measure.bench_server("i22-patched-e4", "patched", e4))
    baselines = ("i22-stock-all-F:decode-8x200k", "i22-patched-e4:decode-8x200k")
    return [
        Phase("i22-e4-stride4:checks", _checks_only(stride.observability(4)), 5, server=server, kind="checks"),
        # 8 prefills of 200K (~72 s at every-4) and 1680 decode steps (~10 s); 31 prefills of 32K (~30 s)
        # and 1680 steps (~15 s)
        *[Phase(f"{server.key}:{part}", stride.sweep(*stride.SWEEPS[part]), estimate, server=server, kind=part)
          for part, estimate in (("decode-8x200k-strides", 90), ("decode-31x32k-strides", 55))],
        *measure.bench_phases(all_f, ["decode-8x200k"]),
        *measure.bench_phases(no_stride, ["decode-8x200k"]),
        Phase("i22-compare", stride.compare(sweep8, baselines[1], baselines[0]), 1, gpu=False,
              needs=(sweep8, *baselines)),
        Phase("i22-topk-8:structure", stride.topk_structure, 25, server=stride.TOPK_SERVER),
        Phase("i22-calibration-8:switches", stride.switches_under_load, 45, server=stride.CALIBRATION_SERVER),
    ]


def checks8() -> list[Phase]:
    """The patched server's PASS/FAIL checks on the 8-layer checkpoints (bad flags, calibration server)."""
    return [Phase("bad-flags", checks.bad_flags, 60, checkpoints=("plain", "glm52", "glm5")),
            Phase("calibration-checks", checks.calibration_checks, 120, server=checks.CALIBRATION_SERVER)]


def bench8() -> list[Phase]:
    """The paper's table on the 8-layer checkpoints (2026-12-02; its decode is host-bound, see perf.md)."""
    calibrated = host.REPO / "docs" / "results" / "live-h200-2026-12-02" / "calibrated.json"
    servers = [
        (measure.bench_server("stock-all-F-8", "stock", "F" * 8, checkpoint="plain", batch=16), None),
        (measure.bench_server("patched-every-4-8", "patched", "FSSSFSSS", checkpoint="own", batch=16,
                              extra=["--enable-metrics"]), checks.flag_wins),
        (measure.bench_server("stock-FSSSFSSS-8", "stock", "FSSSFSSS", checkpoint="plain", batch=16), None),
        # through `indexcache serve --pattern-file` (the bench flags without a pattern flag)
        (dataclasses.replace(measure.bench_server("patched-calibrated-8", "patched", "F" * 8, checkpoint="plain",
                                                  batch=16, extra=["--enable-metrics"]),
                             via_serve=str(calibrated), pattern="FSSSSSSS"),
         checks.observability("FSSSSSSS", "--index-cache-pattern-file")),
    ]
    phases = []
    for spec, own_checks in servers:
        if own_checks:
            phases.append(Phase(f"{spec.key}:checks", _checks_only(own_checks), 5, server=spec, kind="checks"))
        phases += measure.bench_phases(spec, ["prefill", "decode-8x200k"])
    no_flags = measure.bench_server("patched-no-flags-8", "patched", "F" * 8, checkpoint="plain", batch=16)
    phases.append(Phase("patched-no-flags-8:checks", _checks_only(checks.no_index_cache), 5, server=no_flags,
                        kind="checks"))
    phases += measure.bench_phases(no_flags, ["prefill"])
    return phases


def _checks_only(function):
    def run(ctx) -> dict:
        function(ctx)
        return {"headline": f"{sum(c['ok'] for c in ctx.checks)}/{len(ctx.checks)} checks"}
    return run


def script_phase(name: str, argv: list[str], estimate_s: float, tree: str = "stock") -> Phase:
    """A phase that runs a script without a server; ``{out}`` in ``argv`` is its output folder (also $OUT)."""
    def run(ctx) -> dict:
        script = host.REPO / argv[1] if len(argv) > 1 else None
        if script is not None and argv[0] in ("bash", "sh", "python3") and not script.is_file():
            raise FileNotFoundError(f"{argv[1]} is not in this checkout")
        command = [a.replace("{out}", str(ctx.work)) for a in argv]
        environment = dict(host.env(tree), OUT=str(ctx.work))
        t = time.monotonic()
        with open(ctx.work / "log.txt", "w") as log:
            proc = subprocess.run(command, cwd=str(host.REPO), env=environment, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(30.0, ctx.left()))
        ctx.check(f"{' '.join(argv)} exits 0", proc.returncode == 0, (ctx.work / "log.txt").read_text()[-1500:])
        files = sorted(str(p.relative_to(ctx.work)) for p in ctx.work.rglob("*") if p.is_file())
        return {"exit": proc.returncode, "seconds": round(time.monotonic() - t, 1), "files": files,
                "headline": f"exit {proc.returncode}, {len(files)} files"}
    return Phase(name, run, estimate_s)


def issue23() -> list[Phase]:
    """Calibration through the server (issue 23): timing at 78 layers, plain against in-flight at 8 and 16."""
    return calsearch.phases()


def kernels24() -> list[Phase]:
    """The kernel checks of branch `kernels` (issue 24): its script, no server."""
    return [script_phase("kernels-24", ["bash", "scripts/gpu_kernels_24.sh", "{out}"], 240)]


PLANS = {"issue21": issue21, "issue22": issue22, "checks": checks8, "bench8": bench8, "issue23": issue23,
         "kernels24": kernels24}


def build(names: list[str]) -> list[Phase]:
    """The phases of the named plans in order, after one set-up phase for all their checkpoints."""
    phases = [p for name in names for p in PLANS[name]()]
    wanted = []
    for phase in phases:
        for name in [*phase.checkpoints, *([phase.server.checkpoint] if phase.server else [])]:
            if name not in wanted:
                wanted.append(name)
    # install + patch + imports ~30 s (2026-12-02: 62 s with 12.5 GB of checkpoints); ~45 s per 8 GB checkpoint
    # (2026-12-04: the 32-layer one in 35 s), config and indexer tensors a few seconds
    estimate = 30 + sum(8 if "--weights" in host.CHECKPOINTS[n] else 45 if host.layers(n) >= 32 else
                        20 if host.layers(n) >= 16 else 8 for n in wanted)
    return [Phase("setup", host.setup_phase(wanted), estimate, checkpoints=tuple(wanted)), *phases]
