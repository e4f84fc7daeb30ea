"""A resumable, deadline-aware queue of phases (no SGLang knowledge here).

A **phase** is a function ``run(ctx) -> dict``, an estimate of its own device seconds, the server it
needs (``None``: none; a GPU phase without a server stops any running one first) and the phases whose
results it reads (``needs``). A call of the runner walks the queue in order and

- never starts a phase whose estimate plus, where its server is not up, that server's start estimate
  exceeds the time left (``budget - RESERVE_S``); when the server's start alone fits, it launches the
  server detached (it keeps starting between the calls) and ends the call;
- keeps its state in a JSON file (``/tmp/ic-live/state.json`` on the GPU host): which phases are done,
  failed or blocked, their results, measured durations, which server runs with which arguments;
  the next call continues where this one stopped;
- leaves the server running (in its own process session, so it outlives the call) while GPU work is
  queued: the next call reuses it when its first phase needs the same one, or stops it first;
- packs everything measured so far after every phase (``pack(state)``; files a phase publishes with
  ``ctx.publish`` come back as they are), and prints a short table.

Estimates: a phase's estimate is 1.1 x the last measured duration of its ``kind`` (phases of one kind
do the same work on another server), else its default times the median ratio measured / default of
the phases done so far (clamped to 0.8-1.6: a host that runs everything 30% slower than guessed
will run the rest slower too).
"""

from __future__ import annotations

import fnmatch
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sglang_indexcache.atomic import atomic_write_json

RESERVE_S = 15.0  # seconds kept at the end of a call for packing and the table
FINAL = ("done", "failed", "blocked")
RESULTS_DIR = "results"  # under the work root: files phases publish (Context.publish), returned as they are


class Blocked(Exception):
    """The phase cannot run here: something it needs is missing (recorded as blocked, not failed)."""


class NotReady(Exception):
    """The phase's server is still starting at the call's deadline: it stays up for the next call."""


@dataclass
class Phase:
    name: str
    run: Callable
    estimate_s: float
    server: object | None = None  # servers.ServerSpec (anything with ``key``)
    needs: tuple = ()
    kind: str | None = None  # phases of one kind share measured durations (default: the name)
    gpu: bool = True  # False: host-only work (comparisons) that may run beside any server
    checkpoints: tuple = ()  # checkpoints it needs beyond its server's (the set-up phase writes them)


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class State:
    """The runner's memory between calls: one JSON file, rewritten atomically after every change."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            self.fresh = False
        else:
            self.data = {"version": 1, "phases": {}, "durations": {}, "server": None, "servers": {},
                         "warm": False, "calls": []}
            self.fresh = True

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def phase(self, name: str) -> dict:
        return self.data["phases"].get(name, {})

    def status(self, name: str) -> str | None:
        return self.phase(name).get("status")

    def record(self, name: str, **fields) -> None:
        self.data["phases"].setdefault(name, {}).update(fields)
        self.save()

    def seed(self, summary: dict, arrays: dict | None = None) -> list[str]:
        """Take the done phases of an earlier call's summary (another machine); returns their names."""
        taken = []
        for name, entry in (summary.get("phases") or {}).items():
            if entry.get("status") == "done" and name not in self.data["phases"]:
                entry = json.loads(json.dumps(entry))
                entry.setdefault("result", {}).update((arrays or {}).get(name, {}))
                self.data["phases"][name] = dict(entry, seeded=True)
                taken.append(name)
        self.save()
        return taken

    def estimate(self, phase: Phase) -> float:
        seen = self.data["durations"].get(phase.kind or phase.name)
        if seen:
            return 1.1 * seen[-1]
        return phase.estimate_s * self.bias()

    def bias(self) -> float:
        ratios = [p["seconds"] / p["default_estimate_s"] for p in self.data["phases"].values()
                  if p.get("status") == "done" and (p.get("default_estimate_s") or 0) >= 5
                  and p.get("seconds") is not None and not p.get("seeded")]
        return min(1.6, max(0.8, statistics.median(ratios))) if ratios else 1.0

    def add_duration(self, kind: str, seconds: float) -> None:
        self.data["durations"].setdefault(kind, []).append(round(seconds, 1))


@dataclass
class Context:
    """What a phase function gets: its folder, the running server, other phases' results, checks."""

    phase: Phase
    work: Path
    root: Path
    state: State
    clock: object
    deadline: float
    server: object | None = None
    checks: list = field(default_factory=list)
    log: Callable = print

    def result(self, name: str) -> dict:
        entry = self.state.phase(name)
        if entry.get("status") != "done":
            raise Blocked(f"needs the result of {name} ({entry.get('status') or 'not run'})")
        return entry.get("result") or {}

    def left(self) -> float:
        return self.deadline - self.clock.now()

    def timeout(self) -> float:
        """Seconds a request of this phase may take: past the deadline, but before the call is killed."""
        return max(60.0, self.left() + RESERVE_S + 10.0)

    def publish(self, name: str, document: dict) -> Path:
        """Write ``document`` as JSON to the work root's ``results/NAME``: it comes back as it is, beside
        summary.json (the device returns 8 files: publish few)."""
        path = self.root / RESULTS_DIR / name
        atomic_write_json(path, document)
        return path

    def check(self, name: str, ok, detail="") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)[:2000]})
        self.log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {str(detail)[:300]}" if detail and not ok else ""))
        return bool(ok)


def select(phases: list[Phase], skip: str = "") -> list[Phase]:
    """Drop the phases whose names match one of the comma-separated glob patterns in ``skip``."""
    patterns = [p.strip() for p in skip.split(",") if p.strip()]
    return [p for p in phases if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]


class Runner:
    def __init__(self, phases: list[Phase], state: State, servers, root, budget_s: float, clock=None,
                 pack: Callable | None = None, log: Callable = print):
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        self.phases, self.state, self.servers = phases, state, servers
        self.root, self.budget_s, self.clock = Path(root), budget_s, clock or RealClock()
        self.pack, self.log = pack or (lambda state: None), log
        self.deadline = 0.0
        self.note = ""

    # ---------------------------------------------------------------- the queue
    def pending(self) -> list[Phase]:
        return [p for p in self.phases if self.state.status(p.name) not in FINAL]

    def _blocker(self, phase: Phase) -> str | None:
        names = {p.name for p in self.phases}
        for need in phase.needs:
            status = self.state.status(need)
            if status in ("failed", "blocked"):
                return f"needs {need}, which {status}"
            if status != "done" and need not in names:
                return f"needs {need}, which is not in this plan"
        broken = phase.server is not None and self.state.data["servers"].get(phase.server.key, {}).get("broken")
        return f"server {phase.server.key} did not start: {broken}" if broken else None

    def _ready(self, phase: Phase) -> bool:
        return all(self.state.status(n) == "done" for n in phase.needs)

    def _cost(self, phase: Phase) -> tuple[float, float]:
        start = 0.0
        if phase.server is not None and self.servers.running_key() != phase.server.key:
            start = self.servers.start_estimate(phase.server)
        return self.state.estimate(phase), start

    def run(self) -> int:
        self.deadline = self.clock.now() + self.budget_s - RESERVE_S
        call = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": self.budget_s, "ran": [],
                "fresh_state": self.state.fresh}
        self.state.data["calls"].append(call)
        self._interrupted()
        self.servers.adopt()
        for phase in self.pending():
            if self.state.status(phase.name) in FINAL:
                continue
            blocker = self._blocker(phase)
            if blocker:
                self.state.record(phase.name, status="blocked", error=blocker)
                self.log(f"blocked {phase.name}: {blocker}")
                continue
            if not self._ready(phase):
                continue  # a need comes later in the queue (or was skipped this call)
            own, start = self._cost(phase)
            left = self.deadline - self.clock.now()
            if own + start > left:
                if not phase.gpu:
                    continue
                self._stop_here(phase, own, start, left)
                break
            if not self._run(phase, call):
                break
        self._leave_or_stop()
        return self._finish()

    def _interrupted(self) -> None:
        """Phases still 'running' were killed with their call (its time limit): estimate them longer."""
        for phase in self.phases:
            entry = self.state.phase(phase.name)
            if entry.get("status") != "running":
                continue
            tries = entry.get("interrupted", 0) + 1
            self.state.add_duration(phase.kind or phase.name, 2 * (entry.get("estimate_s") or phase.estimate_s))
            status = "failed" if tries >= 2 else None
            self.state.record(phase.name, status=status, interrupted=tries,
                              error=f"interrupted {tries} time(s): its call ended (killed?) while it ran")
            self.log(f"{phase.name} was interrupted in call {entry.get('call')}" + ("; failed" if status else
                     "; its estimate doubles"))

    def _stop_here(self, phase: Phase, own: float, start: float, left: float) -> None:
        self.note = (f"{phase.name} needs ~{own + start:.0f} s ({own:.0f} s + {start:.0f} s server start),"
                     f" {max(left, 0):.0f} s left in this call")
        if phase.server is not None and start and start <= left:
            try:
                self.servers.launch(phase.server)
                self.note += f"; server {phase.server.key} launched for the next call"
            except Exception as exc:  # noqa: BLE001 - e.g. its arguments need a result not there yet
                self.note += f"; server {phase.server.key} not launched ahead: {exc}"
        self.log(self.note)

    def _leave_or_stop(self) -> None:
        """Keep the server up while GPU work is queued: the next call reuses it or stops it first.

        Stopping takes seconds that the end of a call may not have; only an empty queue stops it."""
        running = self.servers.running_key()
        if running is None:
            return
        following = next((p for p in self.pending() if self._blocker(p) is None and p.gpu), None)
        if following is None:
            self.servers.stop()
        elif following.server is not None and following.server.key == running:
            self.log(f"server {running} left running for {following.name}")
        else:
            self.log(f"server {running} left running; the next call stops it before {following.name}")

    # ---------------------------------------------------------------- one phase
    def _run(self, phase: Phase, call: dict) -> bool:
        """Run one phase and record it; False when the call must end here (its server is not up yet)."""
        own_estimate, start_estimate = self._cost(phase)
        work = self.root / phase.name.replace(":", "_")
        work.mkdir(parents=True, exist_ok=True)
        self.log(f"phase {phase.name} (estimate {own_estimate:.0f} s"
                 + (f" + {start_estimate:.0f} s server start)" if start_estimate else ")"))
        t0 = self.clock.now()
        ctx = Context(phase=phase, work=work, root=self.root, state=self.state, clock=self.clock,
                      deadline=self.deadline, log=self.log)
        fields = {"estimate_s": round(own_estimate, 1), "default_estimate_s": phase.estimate_s,
                  "call": len(self.state.data["calls"]), "checks": ctx.checks}
        try:
            if phase.server is not None:
                ctx.server = self.servers.ensure(phase.server, self.deadline)
            elif phase.gpu:
                self.servers.stop()
        except NotReady as exc:
            self.note = f"{exc}; it stays up for the next call"
            self.log(self.note)
            return False
        except Blocked as exc:
            self.state.record(phase.name, status="blocked", error=str(exc), **fields)
            self.log(f"blocked {phase.name}: {exc}")
            return True
        except Exception as exc:  # noqa: BLE001 - a server that does not start fails this phase, not the call
            self._failed(phase, fields, t0, f"server {phase.server.key}: {exc}", work)
            self.state.data["servers"].setdefault(phase.server.key, {})["broken"] = str(exc)[:500]
            self.state.save()
            call["ran"].append(phase.name)
            return True
        t1 = self.clock.now()
        fields["server_start_s"] = round(t1 - t0, 1) if t1 - t0 >= 0.05 else 0.0
        self.state.record(phase.name, status="running", started=time.strftime("%H:%M:%S"), **fields)
        try:
            result = phase.run(ctx) or {}
        except Blocked as exc:
            self.state.record(phase.name, status="blocked", error=str(exc), **fields)
            self.log(f"blocked {phase.name}: {exc}")
            return True
        except Exception as exc:  # noqa: BLE001 - one phase's failure is recorded; the queue goes on
            self._failed(phase, fields, t1, f"{type(exc).__name__}: {exc}", work)
            call["ran"].append(phase.name)
            return True
        seconds = self.clock.now() - t1
        self.state.add_duration(phase.kind or phase.name, seconds)
        self.state.record(phase.name, status="done", seconds=round(seconds, 1), result=result, **fields)
        call["ran"].append(phase.name)
        failed = [c["name"] for c in ctx.checks if not c["ok"]]
        self.log(f"done {phase.name} in {seconds:.0f} s" + (f", {len(failed)} checks failed" if failed else ""))
        self.pack(self.state)
        return True

    def _failed(self, phase: Phase, fields: dict, since: float, error: str, work: Path) -> None:
        (work / "error.txt").write_text(traceback.format_exc())
        if self.clock.now() - since > self.state.estimate(phase):  # a retry gets the time it took
            self.state.add_duration(phase.kind or phase.name, self.clock.now() - since)
        self.state.record(phase.name, status="failed", error=error[:2000],
                          seconds=round(self.clock.now() - since, 1), **fields)
        self.log(f"FAILED {phase.name}: {error[:300]}")
        self.pack(self.state)

    # ---------------------------------------------------------------- the end of a call
    def _finish(self) -> int:
        self.state.data["calls"][-1]["ended"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.state.data["calls"][-1]["note"] = self.note
        self.state.save()
        self.pack(self.state)
        for line in table(self.phases, self.state):
            self.log(line)
        left = self.pending()
        failed = [p.name for p in self.phases if self.state.status(p.name) in ("failed", "blocked")]
        if left:
            total = sum(self.state.estimate(p) for p in left)
            self.log(f"{len(left)} phases left (~{total:.0f} s of work plus server starts): run the same command"
                     " again")
            return 3
        self.log("queue empty" + (f"; failed or blocked: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0


def forecast(phases: list[Phase], state: State, start_estimate: Callable) -> list[str]:
    """The queue as the runner would walk it: each phase's server start and own estimate, cumulated.

    ``start_estimate(spec, warm)``: seconds to start ``spec``'s server (``warm``: JIT caches exist)."""
    rows = [f"{'phase':34} {'server':24} {'start s':>7} {'own s':>6} {'total s':>8}"]
    running, warm, total = state.data["server"] and state.data["server"]["key"], bool(state.data.get("warm")), 0.0
    for phase in phases:
        if state.status(phase.name) in FINAL:
            continue
        start = 0.0
        if phase.server is not None and phase.server.key != running:
            start, running, warm = start_estimate(phase.server, warm), phase.server.key, True
        elif phase.server is None and phase.gpu:
            running = None
        own = state.estimate(phase)
        total += start + own
        server = phase.server.key if phase.server else "-"
        rows.append(f"{phase.name:34} {server:24} {start:7.0f} {own:6.0f} {total:8.0f}")
    return rows


def table(phases: list[Phase], state: State) -> list[str]:
    """The short table printed at the end of a call: one row per phase."""
    rows = [f"{'phase':34} {'status':8} {'est s':>6} {'took s':>7} {'start s':>7}  checks  note"]
    for phase in phases:
        entry = state.phase(phase.name)
        checks = entry.get("checks") or []
        bad = sum(not c["ok"] for c in checks)
        status = entry.get("status") or "pending"
        took = entry.get("seconds")
        note = entry.get("error") or (entry.get("result") or {}).get("headline", "")
        rows.append(f"{phase.name:34} {status:8} {state.estimate(phase):6.0f} "
                    f"{'' if took is None else f'{took:.0f}':>7} {entry.get('server_start_s', ''):>7}  "
                    f"{len(checks) - bad}/{len(checks):<5} {str(note)[:70]}")
    return rows
