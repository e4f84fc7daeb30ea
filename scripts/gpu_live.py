#!/usr/bin/env python3
"""Live measurements of the patched SGLang server on one GPU host, as a resumable queue of phases.

    python3 scripts/gpu_live.py --plan issue21 --out $OUT --budget 560

Runs the plan's phases in order (most valuable first) until the next one's estimate no longer fits
in the budget, keeps its state in /tmp (the host keeps /tmp, and a server started in its own
session, while it stays warm between calls), and writes everything measured so far under --out
after every phase: live.tar.gz, summary.json, arrays.json, summary.md (and the JSON files phases
publish, e.g. the issue23 plan's calibration_timing.json). Call the same command again
until it says the queue is empty (exit 0; 3: phases left; 1: the queue ended with failures).
Needs the offline bundle of `indexcache gpu-bundle` in .gpu/bundle/ (docs/gpu.md). The library is
scripts/live/; docs/gpu.md, "The live runner", says how to add a phase.

    python3 scripts/gpu_live.py --plan issue21 --list          # the queue with its estimates
    python3 scripts/gpu_live.py --report DIR [--md FILE]       # tables from a returned summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
if str(REPO) not in sys.path:  # last: the checkout's kernels/ and calibration/ must not shadow installed packages
    sys.path.append(str(REPO))

from live import host, plans, report, runner  # noqa: E402 - after the path above
from live.servers import ServerManager, start_estimate  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="issue21", help=f"comma-separated, of {', '.join(plans.PLANS)}"
                        " (default issue21)")
    parser.add_argument("--out", help="results folder ($OUT on the device machine)")
    parser.add_argument("--budget", type=float, default=560, help="seconds this call may take (default 560)")
    parser.add_argument("--skip", default="", help="comma-separated glob patterns of phase names to leave out,"
                        " e.g. '*:decode-32x32k,stock-e8:*'")
    parser.add_argument("--retry", default="", help="glob patterns of failed or blocked phases to run again")
    parser.add_argument("--resume-from", metavar="DIR", help="a folder holding an earlier call's summary.json"
                        " (and arrays.json): on a fresh machine its done phases are not run again")
    parser.add_argument("--state", default="/tmp/ic-live/state.json", help="the runner's state (default %(default)s)")
    parser.add_argument("--work", default="/tmp/ic-work", help="logs and results kept between calls")
    parser.add_argument("--list", action="store_true", help="print the queue with its estimates and exit")
    parser.add_argument("--report", metavar="DIR", help="print the Markdown tables of DIR/summary.json and exit")
    parser.add_argument("--md", metavar="FILE", help="with --report: write the tables here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.plan.split(",") if n.strip()]
    unknown = [n for n in names if n not in plans.PLANS]
    if unknown:
        parser.exit(2, f"gpu_live: error: unknown plan {unknown[0]!r}; choose from {', '.join(plans.PLANS)}\n")
    if not (args.list or args.report or args.out):
        parser.exit(2, "gpu_live: error: --out is required (or --list, --report)\n")
    if args.report and not (Path(args.report) / "summary.json").is_file():
        parser.exit(2, f"gpu_live: error: --report {args.report}: no summary.json there\n")
    args.plans = names
    return args


def prepare(args, state: runner.State) -> list[runner.Phase]:
    phases = runner.select(plans.build(args.plans), args.skip)
    if state.fresh and args.resume_from:
        folder = Path(args.resume_from)
        earlier = json.loads((folder / "summary.json").read_text())
        arrays = json.loads((folder / "arrays.json").read_text()) if (folder / "arrays.json").is_file() else {}
        earlier["phases"].pop("setup", None)  # a fresh machine sets itself up again
        log(f"seeded from {folder}: {', '.join(state.seed(earlier, arrays)) or 'nothing'}")
    setup = phases[0]
    if state.status("setup") == "done" and any(not (host.CK / c / "config.json").is_file() for c in setup.checkpoints):
        state.record("setup", status=None)  # a plan added since needs another checkpoint
    retry = {p.name for p in phases} - {p.name for p in runner.select(phases, args.retry)}  # the names matched
    for name in retry:
        if state.status(name) in ("failed", "blocked"):
            state.record(name, status=None, error=None)
    for key, record in state.data["servers"].items():
        if record.get("broken") and any(p.server and p.server.key == key and p.name in retry for p in phases):
            record.pop("broken")
    return phases


def main(argv=None, clock=None, launcher=None, url: str = host.URL) -> int:
    args = parse(argv)
    if args.report:
        text = report.markdown(report.load(args.report))
        if args.md:
            from sglang_indexcache.atomic import atomic_write_text

            atomic_write_text(args.md, text)
        else:
            print(text, end="")
        return 0
    state = runner.State(args.state)
    phases = prepare(args, state)
    if args.list:
        for line in runner.forecast(phases, state, lambda spec, warm: start_estimate(state, spec, warm)):
            print(line)
        return 0
    clock = clock or runner.RealClock()
    work = Path(args.work)
    servers = ServerManager(state, launcher or host.launcher, work / "servers", url, clock, log=log)
    run = runner.Runner(phases, state, servers, work, args.budget, clock=clock,
                        pack=lambda st: report.pack(args.out, work, st.data), log=log)
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
