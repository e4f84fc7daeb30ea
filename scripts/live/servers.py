"""SGLang servers that outlive a call: started in their own process session, found again by pid.

A :class:`ServerSpec` names one server setup (tree, checkpoint, flags); :class:`ServerManager` keeps
at most one running, recorded in the runner's state (``state.data["server"]``: key, pid, resolved
arguments, log file and offset). The next call adopts it if its process is still alive; the runner
decides whether to keep it (the next phase needs the same key and arguments) or stop it.

How a spec becomes a command line is the ``launcher``'s business (``host.launcher`` on the GPU
host, a stub server in the CPU test): ``launcher(spec, args) -> (argv, env, cwd)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sglang_indexcache.bench import serve_log
from sglang_indexcache.bench.serve import Client, ServeError

from .runner import NotReady

# seconds to /health: a fresh machine's first start compiles the JIT kernels (FlashInfer, DeepGEMM,
# tvm-ffi; 201-247 s measured), later starts 48-71 s; no CUDA graphs (calibration mode) saves the
# capture; the 78-layer stack captures and loads 2.4x the layers (without graphs: a guess between)
START_DEFAULTS = {"first": 240.0, "graphs": 70.0, "nograph": 50.0, "deep": 120.0, "deep-nograph": 90.0}
START_LIMIT_S = 600.0


class ServerError(RuntimeError):
    """The server process exited, or did not answer /health within START_LIMIT_S."""


@dataclass(frozen=True)
class ServerSpec:
    key: str  # the server's name; also the tag of its bench serve documents
    tree: str  # "stock" (the bundle's SGLang) or "patched" (the patched copy)
    checkpoint: str  # a name of host.CHECKPOINTS
    args: tuple = ()  # SGLang flags beyond the common ones
    resolve: Callable | None = None  # state -> more flags, computed at start (may raise runner.Blocked)
    start_kind: str = "graphs"  # which start estimate applies (START_DEFAULTS)
    pattern: str | None = None  # the F/S pattern it runs (recorded with its measurements)
    via_serve: str | None = None  # a pattern file: launched through `indexcache serve`

    def resolved_args(self, state) -> list[str]:
        return [str(a) for a in self.args] + [str(a) for a in (self.resolve(state) if self.resolve else [])]


def start_estimate(state, spec: ServerSpec, warm: bool) -> float:
    """Seconds to /health: 1.1 x the last measured start of its kind, else START_DEFAULTS."""
    kind = spec.start_kind if warm else "first"
    seen = state.data["durations"].get(f"start:{kind}")
    return 1.1 * seen[-1] if seen else START_DEFAULTS.get(kind, START_DEFAULTS["graphs"])


@dataclass
class ServerHandle:
    spec: ServerSpec
    url: str
    log_path: Path
    log_offset: int
    args: list
    startup: dict

    def log_text(self) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(self.log_offset)
            return handle.read().decode("utf-8", "replace")

    def window(self) -> serve_log.LogWindow:
        window = serve_log.LogWindow(str(self.log_path))
        window.start()
        return window

    def client(self, timeout_s: float = 900.0, api_key: str | None = None) -> Client:
        return Client(self.url, timeout_s=timeout_s, api_key=api_key)


class ServerManager:
    def __init__(self, state, launcher: Callable, logs: Path, url: str, clock, log: Callable = print):
        self.state, self.launcher, self.logs, self.url = state, launcher, Path(logs), url
        self.clock, self.log = clock, log
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ what runs
    def _entry(self) -> dict | None:
        return self.state.data.get("server")

    def _alive(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        try:  # a zombie answers kill(0) but serves nothing
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True

    def adopt(self) -> None:
        """At a call's start: forget a recorded server whose process is gone."""
        entry = self._entry()
        if entry and not self._alive(entry["pid"]):
            self.log(f"server {entry['key']} of the last call is gone")
            self.state.data["server"] = None
            self.state.save()

    def running_key(self) -> str | None:
        entry = self._entry()
        return entry["key"] if entry and self._alive(entry["pid"]) else None

    def start_estimate(self, spec: ServerSpec, warm: bool | None = None) -> float:
        return start_estimate(self.state, spec, self.state.data.get("warm") if warm is None else warm)

    # ------------------------------------------------------------ start and stop
    def launch(self, spec: ServerSpec, args: list | None = None) -> None:
        """Start ``spec`` in its own session (it survives the call) without waiting for it."""
        args = spec.resolved_args(self.state) if args is None else args
        self.stop()
        launched = self.clock.now()
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"server_{spec.key}.log"
        offset = log_path.stat().st_size if log_path.is_file() else 0
        argv, env, cwd = self.launcher(spec, args)
        with open(log_path, "ab") as out:
            out.write(f"=== live runner: launch {spec.key} at {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                          start_new_session=True)
        self.state.data["server"] = {"key": spec.key, "pid": self._proc.pid, "args": args, "log": str(log_path),
                                     "log_offset": offset, "launched": launched, "healthy": False,
                                     "launched_call": len(self.state.data["calls"]),
                                     "start_kind": spec.start_kind if self.state.data.get("warm") else "first"}
        self.state.save()
        self.log(f"server {spec.key} launched (pid {self._proc.pid})")

    def ensure(self, spec: ServerSpec, deadline: float) -> ServerHandle:
        """The running server for ``spec`` (started, or adopted from the last call), healthy."""
        args = spec.resolved_args(self.state)
        entry = self._entry()
        if not (entry and entry["key"] == spec.key and entry["args"] == args and self._alive(entry["pid"])):
            self.launch(spec, args)
            entry = self._entry()
        if not entry["healthy"]:
            self._wait_healthy(spec, entry, deadline)
        return ServerHandle(spec=spec, url=self.url, log_path=Path(entry["log"]), log_offset=entry["log_offset"],
                            args=args, startup=self.state.data["servers"][spec.key]["startup"])

    def _wait_healthy(self, spec: ServerSpec, entry: dict, deadline: float) -> None:
        client = Client(self.url, timeout_s=5)
        t0 = self.clock.now()
        while True:
            if not self._alive(entry["pid"]):
                tail = Path(entry["log"]).read_bytes()[-3000:].decode("utf-8", "replace")
                self.state.data["server"] = None
                self.state.save()
                raise ServerError(f"exited before /health answered; log tail:\n{tail}")
            try:
                client.get_json("/health", timeout=5)
                break
            except ServeError:
                pass
            if self.clock.now() > deadline:
                raise NotReady(f"server {spec.key} still starting at the call's deadline")
            if self.clock.now() - t0 > START_LIMIT_S:
                self.stop()
                raise ServerError(f"no /health after {START_LIMIT_S:.0f} s")
            self.clock.sleep(1.0)
        # a server launched by an earlier call (at its end) started partly between the calls: its
        # start is no estimate of a start (and that call's clock is not this one's)
        same_call = entry.get("launched_call") == len(self.state.data["calls"])
        seconds = self.clock.now() - entry["launched"] if same_call else None
        entry["healthy"] = True
        text = Path(entry["log"]).read_bytes()[entry["log_offset"]:].decode("utf-8", "replace")
        record = self.state.data["servers"].setdefault(spec.key, {})
        record["startup"] = dict(serve_log.startup(text), startup_s=None if seconds is None else round(seconds, 1),
                                 args=entry["args"], tree=spec.tree, checkpoint=spec.checkpoint, pattern=spec.pattern)
        record.setdefault("starts", []).append(None if seconds is None else round(seconds, 1))
        if seconds is not None:
            self.state.add_duration(f"start:{entry['start_kind']}", seconds)
        self.state.data["warm"] = True
        self.state.save()
        self.log(f"server {spec.key} healthy" + ("" if seconds is None else f" after {seconds:.0f} s"))

    def stop(self) -> None:
        entry = self._entry()
        if not entry:
            return
        pid = entry["pid"]
        if self._alive(pid) or _group_members(pid):
            self._signal(pid, signal.SIGTERM)
            if not self._gone(pid, 30):
                self._signal(pid, signal.SIGKILL)
                self._gone(pid, 10)
        client = Client(self.url, timeout_s=2)
        for _ in range(30):  # the port (and with it the GPU memory) is free again
            try:
                client.get_json("/health", timeout=2)
            except ServeError:
                break
            time.sleep(1)
        self.log(f"server {entry['key']} stopped")
        self.state.data["server"] = None
        self.state.save()

    def _signal(self, pid: int, sig) -> None:
        try:
            os.killpg(pid, sig)  # the server's own session: its scheduler and detokenizer go too
        except OSError:
            pass

    def _gone(self, pid: int, seconds: float) -> bool:
        """Whether the server and every process of its group (scheduler, detokenizer) exited in time.

        The group matters: a scheduler still holding GPU memory would shrink the next server's pool."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self._alive(pid) and not _group_members(pid):
                return True
            time.sleep(0.2)
        return not self._alive(pid) and not _group_members(pid)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members
