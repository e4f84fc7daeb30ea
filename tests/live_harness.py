"""The live runner's test harness: calls of scripts/gpu_live.py's main on a fake clock, servers that
are processes of tests/live_stub_server.py (tests/test_live_runner.py, tests/test_live_calibration.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_live  # noqa: E402
from live import host, plans, runner, servers  # noqa: E402

STUB = Path(__file__).resolve().parent / "live_stub_server.py"
BUDGET, RESERVE = 560.0, runner.RESERVE_S


class FakeClock:
    """Device seconds: phases and server starts advance it by their estimates; sleeping advances it."""

    def __init__(self):
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        time.sleep(0.02)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Harness:
    """Calls of gpu_live.main against stub servers, each call with a fresh fake clock."""

    def __init__(self, tmp_path, monkeypatch, extra_phases=None):
        self.tmp, self.state_path, self.work = tmp_path, tmp_path / "state.json", tmp_path / "work"
        self.port = _free_port()
        self.clock = FakeClock()
        self.launches: list[str] = []
        self.fail_start: set[str] = set()
        self.stub_args: dict[str, list] = {}  # checkpoint name -> more stub flags (--stub-model DIR ...)
        build = plans.build

        def small_build(names):
            phases = build(names) if extra_phases is None else [build(names)[0], *extra_phases]
            return [dataclasses.replace(phase, run=self._timed(phase)) for phase in phases]
        monkeypatch.setattr(gpu_live.plans, "build", small_build)
        monkeypatch.setattr(host, "CK", tmp_path / "checkpoints")  # every checkpoint "written" by the stub set-up
        for name in host.CHECKPOINTS:
            (host.CK / name).mkdir(parents=True, exist_ok=True)
            (host.CK / name / "config.json").write_text("{}")

    def _timed(self, phase):
        real = phase.run

        def run(ctx):
            result = {"headline": "set up (stub)"} if phase.name == "setup" else real(ctx)
            ctx.clock.advance(phase.estimate_s)
            return result
        return run

    def launcher(self, spec, args):
        state = runner.State(self.state_path)
        self.clock.advance(servers.start_estimate(state, spec, bool(state.data.get("warm"))))
        self.launches.append(spec.key)
        layers = host.layers(spec.checkpoint) if spec.checkpoint in host.CHECKPOINTS else len(spec.pattern)
        argv = [sys.executable, str(STUB), "--stub-layers", str(layers), "--stub-tree", spec.tree, *args,
                *map(str, self.stub_args.get(spec.checkpoint, [])), "--port", str(self.port)]
        if spec.key in self.fail_start:
            argv = [sys.executable, "-c", "import sys; print('IndexCache: error: stub refuses'); sys.exit(2)"]
        return argv, dict(os.environ), str(self.tmp)

    def call(self, *extra, plan="issue21", budget=BUDGET) -> tuple[int, Path]:
        self.clock = FakeClock()
        out = self.tmp / f"out{len(list(self.tmp.glob('out*')))}"
        rc = gpu_live.main(["--plan", plan, "--out", str(out), "--budget", str(budget), "--state", str(self.state_path),
                            "--work", str(self.work), *extra], clock=self.clock, launcher=self.launcher,
                           url=f"http://127.0.0.1:{self.port}")
        return rc, out

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def stop(self) -> None:
        entry = self.state().get("server") if self.state_path.is_file() else None
        if entry:
            try:
                os.killpg(entry["pid"], signal.SIGKILL)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
