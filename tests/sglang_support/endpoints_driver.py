"""Exercise the patched SGLang's IndexCache endpoints in one process, with no GPU and no server.

``python endpoints_driver.py CHECKPOINT RESULTS.json`` with the patched tree on PYTHONPATH. The real
pieces: SGLang's FastAPI app (our three routes) behind SGLang's own API-key middleware, the
``TokenizerControlMixin.index_cache`` and ``Scheduler.handle_index_cache`` methods the patches add,
SGLang's msgpack IPC codec for the request/reply types. Stand-ins: the scheduler's idle check and
cache flush, the model (layers with ``skip_topk``/``next_skip_topk``/``indexer``), and the
tokenizer manager's ``generate_request`` (returns a synthetic captured top-k: layer l selects
keys ``t + l .. t + l + 3`` for token t, so the recall of layer s's top-k against layer j's is
``(4 - |j - s|) / 4``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pybase64

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
N, K, TOKENS = 8, 4, 5
ADMIN_KEY = "admin-secret"


def _model():
    layers = [SimpleNamespace(self_attn=SimpleNamespace(skip_topk=False, next_skip_topk=False, indexer=object()))
              for _ in range(N)]
    return SimpleNamespace(model=SimpleNamespace(layers=layers))


async def call(app, method, path, body=None, key=None):
    """One HTTP request straight into the ASGI app: (status, decoded JSON or text)."""
    payload = json.dumps(body).encode() if body is not None else b""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 5000), "root_path": ""}
    inbox, sent = [{"type": "http.request", "body": payload, "more_body": False}], []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _sglang():
    """The real SGLang pieces the driver uses (imported with sgl_kernel stubbed on a CPU)."""
    from sglang.test.test_utils import maybe_stub_sgl_kernel

    maybe_stub_sgl_kernel()
    from prometheus_client import Gauge
    from sglang.srt.entrypoints import http_server
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.tokenizer_control_mixin import _COMMUNICATOR_SPECS, TokenizerControlMixin
    from sglang.srt.state_capturer.indexer_topk import set_global_indexer_capturer
    from sglang.srt.utils.auth import add_api_key_middleware

    return SimpleNamespace(Gauge=Gauge, http_server=http_server, io_struct=io_struct, Scheduler=Scheduler,
                           communicator_specs=_COMMUNICATOR_SPECS, TokenizerControlMixin=TokenizerControlMixin,
                           set_global_indexer_capturer=set_global_indexer_capturer,
                           add_api_key_middleware=add_api_key_middleware)


class _Scheduler:
    """The stand-in scheduler: running requests (the first switch retracts them), then paused by
    someone else for two checks (the HTTP side retries), then idle. ``busy`` records what it saw."""

    running_batch = SimpleNamespace(reqs=["r1", "r2", "r3"])
    chunked_req = "r4"
    _engine_paused = False
    idle = False

    def __init__(self, model, runtime):
        self.model, self.runtime = model, runtime
        self.busy = {"left": 2, "idle_checks": 0, "flushes": 0, "events": []}

    def is_fully_idle(self):
        self.busy["idle_checks"] += 1
        if self._engine_paused:
            self.busy["left"] -= 1
            if self.busy["left"] < 0:
                self._engine_paused, self.idle = False, True
        return self.idle

    def flush_cache(self):
        self.busy["flushes"] += 1
        return True

    def pause_generation(self, req):
        self.busy["events"].append(["pause", req.mode, self.runtime.model_pattern(self.model)])
        self._engine_paused = True

    def continue_generation(self, req):
        self.busy["events"].append(["continue", self.runtime.model_pattern(self.model)])
        self._engine_paused = False


def _tokenizer_manager(sg, runtime, server_args, model, scheduler, seen):
    """The tokenizer manager's stand-in: SGLang's real ``index_cache`` method and IPC codec, a
    ``generate_request`` that returns the synthetic captured top-k (and records what it was asked)."""
    codec = (sg.io_struct._msgpack_encoder, sg.io_struct._msgpack_decoder)

    async def communicator(obj):  # tokenizer -> scheduler -> tokenizer, through the IPC codec
        received = codec[1].decode(codec[0].encode(obj))
        reply = sg.Scheduler.handle_index_cache(scheduler, received)
        return [codec[1].decode(codec[0].encode(reply))]

    async def generate_request(obj, request):
        seen["generate_patterns"].append(runtime.model_pattern(model))
        seen["return_indexer_topk"] = obj.return_indexer_topk
        outputs = []
        for _ in obj.text:
            topk = np.array([[[t + l + i for i in range(K)] for l in range(N)] for t in range(TOKENS)], np.int32)
            outputs.append({"meta_info": {"indexer_topk": pybase64.b64encode(topk.tobytes()).decode()}})
        yield outputs

    tm = SimpleNamespace(server_args=server_args, auto_create_handle_loop=lambda: None,
                         index_cache_communicator=communicator, generate_request=generate_request,
                         model_config=SimpleNamespace(hf_text_config=SimpleNamespace(num_hidden_layers=N, index_topk=K)))
    tm.index_cache = lambda obj: sg.TokenizerControlMixin.index_cache(tm, obj)
    return tm


async def _scenario(sg, runtime, app, server_args, model, scheduler, seen, out):
    """The requests, in order, and what the model, scheduler and gauge show after each."""
    gauge, busy = runtime._STATE["gauge"], scheduler.busy
    out["get_no_key"] = await call(app, "GET", "/index_cache")
    out["get"] = await call(app, "GET", "/index_cache", key=ADMIN_KEY)
    out["gauge_start"] = gauge._value.get()
    out["set_no_key"] = await call(app, "POST", "/index_cache/pattern", {"pattern": "FSSSFSSS"})
    out["set_in_flight"] = await call(app, "POST", "/index_cache/pattern", {"pattern": "FSFSFSFS"}, key=ADMIN_KEY)
    out["after_in_flight"] = {"model": runtime.model_pattern(model), **json.loads(json.dumps(busy))}
    scheduler._engine_paused = True  # paused by another request: busy until it ends
    out["set"] = await call(app, "POST", "/index_cache/pattern", {"pattern": " fsssfsss "}, key=ADMIN_KEY)
    out["after_set"] = {"model": runtime.model_pattern(model), **busy, "gauge": gauge._value.get(),
                        "next": [a.self_attn.next_skip_topk for a in model.model.layers]}
    out["set_invalid"] = await call(app, "POST", "/index_cache/pattern", {"pattern": "SFFFFFFF"}, key=ADMIN_KEY)
    out["set_bad_body"] = await call(app, "POST", "/index_cache/pattern", {"p": 1}, key=ADMIN_KEY)
    out["after_invalid"] = {"model": runtime.model_pattern(model), "flushes": busy["flushes"]}
    await _stride_scenario(runtime, app, server_args, model, out)
    out["overlap_bad_body"] = await call(app, "POST", "/index_cache/overlap", {"text": []}, key=ADMIN_KEY)
    out["overlap_no_capture"] = await call(app, "POST", "/index_cache/overlap", {"text": ["a"]}, key=ADMIN_KEY)
    sg.set_global_indexer_capturer(SimpleNamespace())  # as --enable-return-indexer-topk would
    out["overlap"] = await call(app, "POST", "/index_cache/overlap", {"text": ["a b", "c"]}, key=ADMIN_KEY)
    sg.set_global_indexer_capturer(None)
    out["after_overlap"] = {"model": runtime.model_pattern(model), **seen}
    out["server_info"] = runtime.server_info(server_args)
    server_args.index_cache_pattern, server_args.index_cache_calibration = None, False
    out["get_flags_off"] = await call(app, "GET", "/index_cache", key=ADMIN_KEY)
    out["stride_flags_off"] = await call(app, "POST", "/index_cache/stride", {"decode_stride": 2}, key=ADMIN_KEY)
    out["server_info_flags_off"] = runtime.server_info(server_args)


async def _stride_scenario(runtime, app, server_args, model, out):
    """The decode stride (0007): calibration mode switches it between batches, like patterns."""
    out["stride_no_key"] = await call(app, "POST", "/index_cache/stride", {"decode_stride": 4})
    out["stride"] = await call(app, "POST", "/index_cache/stride", {"decode_stride": 4}, key=ADMIN_KEY)
    out["stride_gauge"] = runtime._STATE["stride_gauge"]._value.get()
    out["stride_layers"] = await call(app, "POST", "/index_cache/stride",
                                      {"decode_stride": [2, 1, 1, 1, 8, 1, 1, 1]}, key=ADMIN_KEY)
    out["stride_bad"] = [await call(app, "POST", "/index_cache/stride", body, key=ADMIN_KEY)
                         for body in ({"decode_stride": 0}, {"decode_stride": [4, 4]}, {"stride": 4},
                                      {"decode_stride": True})]
    out["stride_server_info"] = runtime.server_info(server_args)
    out["stride_get"] = await call(app, "GET", "/index_cache", key=ADMIN_KEY)
    # strides that group fine on 2 F layers but would need 5 groups under all-F: that switch is refused
    out["stride_five"] = await call(app, "POST", "/index_cache/stride",
                                    {"decode_stride": [2, 4, 8, 16, 32, 1, 1, 1]}, key=ADMIN_KEY)
    out["all_f_refused"] = await call(app, "POST", "/index_cache/pattern", {"pattern": "F" * N}, key=ADMIN_KEY)
    out["after_refused"] = runtime.model_pattern(model)
    await call(app, "POST", "/index_cache/stride", {"decode_stride": 4}, key=ADMIN_KEY)


def main(checkpoint, results_path):
    sg = _sglang()
    from sglang_indexcache.sglang_overlay import runtime

    out = {"communicator": [s[0] for s in sg.communicator_specs if s[0] == "index_cache"]}
    server_args = SimpleNamespace(model_path=checkpoint, index_cache_pattern="FSSFSSSF", index_cache_every=None,
                                  index_cache_pattern_file=None, index_cache_calibration=True,
                                  json_model_override_args="{}")
    model = _model()
    runtime.on_model_loaded(SimpleNamespace(is_draft_worker=False, model=model, server_args=server_args))
    runtime.make_gauge(sg.Gauge, {"model_name": "tiny"}, server_args)
    scheduler, seen = _Scheduler(model, runtime), {"generate_patterns": []}
    tm = _tokenizer_manager(sg, runtime, server_args, model, scheduler, seen)
    sg.http_server.set_global_state(SimpleNamespace(tokenizer_manager=tm))
    app = sg.http_server.app
    sg.add_api_key_middleware(app, api_key=None, admin_api_key=ADMIN_KEY)
    asyncio.run(_scenario(sg, runtime, app, server_args, model, scheduler, seen, out))
    with open(results_path, "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
