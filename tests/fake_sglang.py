"""A stand-in for a patched SGLang server in calibration mode: the endpoint contract only.

``GET /index_cache``, ``POST /index_cache/pattern`` and SGLang's ``POST /generate`` (prompt
log-probabilities with ``return_logprob``, ``meta_info.e2e_latency``), answered by a transformers
backend's whole forward under the switched pattern. The search logic under test is the client's.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeSGLang(BaseHTTPRequestHandler):
    backend = None   # a TransformersBackend
    key = "secret"
    delay_s = 0.0    # added to every /generate (to make a run outlast a deadline)
    lock = threading.Lock()
    active = 0       # /generate requests being answered now
    max_active = 0   # the most at once (several only when the client keeps requests in flight)

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self):
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            self._send(401, {"error": "unauthorised"})
            return False
        return True

    def do_GET(self):
        if self._authorised() and self.path == "/index_cache":
            b = self.backend
            self._send(200, {"pattern": b.pattern, "num_layers": b.num_layers, "calibration": True})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/generate":  # SGLang's own route: no admin key
            self._send(200, self._generate(body))
        elif not self._authorised():
            return
        elif self.path == "/index_cache/pattern":
            self.backend.set_pattern(body["pattern"])
            self._send(200, {"pattern": self.backend.pattern})
        else:
            self._send(404, {"error": "no route"})

    def _generate(self, body) -> list:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
        try:
            return generate_reply(self.backend, body, self.delay_s)
        finally:
            with cls.lock:
                cls.active -= 1


def generate_reply(backend, body: dict, delay_s: float = 0.0) -> list:
    """SGLang's ``/generate`` reply to a batch of ``input_ids``: one whole forward of ``backend`` under its
    pattern (prompt log-probabilities with ``return_logprob``, ``meta_info.e2e_latency``)."""
    started = time.perf_counter()
    ids = torch.tensor(body["input_ids"])
    time.sleep(delay_s)
    with torch.no_grad():
        logp = backend.model(ids).logits.float().log_softmax(-1)
    outs = [{"text": "x", "meta_info": {}} for _ in range(ids.shape[0])]
    if body.get("return_logprob"):
        assert body["logprob_start_len"] == 0
        picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        for out, p, r in zip(outs, picked.tolist(), ids.tolist()):
            out["meta_info"]["input_token_logprobs"] = (
                [[None, int(r[0]), None]] + [[float(v), int(t), None] for v, t in zip(p, r[1:])])
    for out in outs:
        out["meta_info"]["e2e_latency"] = time.perf_counter() - started
    return outs


class StubServer:
    """FakeSGLang on a free local port, in a thread; ``url``, ``started``, ``stop()``."""

    def __init__(self, backend, delay_s: float = 0.0):
        FakeSGLang.backend, FakeSGLang.delay_s, FakeSGLang.max_active = backend, delay_s, 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.started = time.time()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
