"""A stand-in SGLang server for the live runner's plumbing test (stdlib; no model, no GPU).

``python live_stub_server.py --stub-layers L --stub-tree stock|patched --port P [SGLang flags...]``
reads the SGLang flags the runner passes (memory fraction, KV dtype, chunk, pattern flags,
calibration mode, max running requests, max total tokens), prints SGLang 0.5.17's start-up lines
(weights, less the S layers' indexers on a patched server with a pattern; KV pool sized the way
0.5.17 sizes it, ``max_total_num_tokens=``) and serves
``/health``, ``/server_info``, ``/metrics``, streamed and non-streamed ``/generate`` (prompt
log-probabilities with ``return_logprob``; a captured top-k with ``return_indexer_topk`` that follows the
decode-stride reuse rule, ``STUB_TOPK`` entries wide), in calibration mode ``/index_cache``, and with a
decode stride ``POST /index_cache/stride`` (the step time follows the stride). It admits a
request only while its pages fit in the pool and fewer than ``--max-running-requests`` - 1 run (a
smaller pool runs fewer long requests at once; 0.5.17 ran 31 with 32 allowed), and logs ``Decode
batch`` lines whose step time grows with the kept indexers. Only the runner's plumbing is tested
with it; the numbers are made up.

With ``--stub-model DIR`` (a small transformers GlmMoeDsa checkpoint, loaded at the first request
that needs it; torch only then) a calibration-mode stub answers non-streamed ``/generate`` batches
with that model's real prompt log-probabilities under the switched pattern (``fake_sglang``), each
``--stub-delay`` seconds late: what ``indexcache calibrate --url`` needs for a search.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
from array import array
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADMIN = "live-admin-key"


def options(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--stub-layers", type=int, required=True)
    p.add_argument("--stub-tree", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mem-fraction-static", type=float, default=0.8)
    p.add_argument("--kv-cache-dtype", default="bfloat16")
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--json-model-override-args", default="{}")
    p.add_argument("--index-cache-every", type=int)
    p.add_argument("--index-cache-pattern")
    p.add_argument("--index-cache-pattern-file")
    p.add_argument("--index-cache-calibration", action="store_true")
    p.add_argument("--admin-api-key")
    p.add_argument("--index-cache-decode-stride", type=int, default=1)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--stub-model")
    p.add_argument("--stub-delay", type=float, default=0.0)
    args, _ = p.parse_known_args(argv)
    return args


class Stub(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 32 clients connect at once (uvicorn's backlog is 2048)

    def __init__(self, args):
        super().__init__(("127.0.0.1", args.port), Handler)
        layers = args.stub_layers
        self.args, self.lock, self.active, self.queued, self.used = args, threading.Lock(), 0, 0, 0
        if args.index_cache_every:
            pattern = "".join("F" if i % args.index_cache_every == 0 else "S" for i in range(layers))
        elif args.index_cache_pattern_file:
            with open(args.index_cache_pattern_file) as handle:
                pattern = json.load(handle)["pattern"]
        else:
            pattern = args.index_cache_pattern or json.loads(args.json_model_override_args).get("index_topk_pattern")
        self.pattern = pattern or "F" * layers
        self.calibration = args.index_cache_calibration
        kv = 656 if args.kv_cache_dtype == "fp8_e4m3" else 1152
        frees = args.stub_tree == "patched" and not self.calibration  # the serving patch: F layers hold index keys
        cell = layers * kv + (self.pattern.count("F") if frees else layers) * 132
        before, weights = 139.09, 0.26 * layers
        if frees:  # and S layers build no indexer (0.5.17): GLM-5's at hidden 2048, in bf16
            weights -= self.pattern.count("S") * (2048 * 32 * 128 + 2048 * (128 + 32) + 2 * 128) * 2 / 2**30
        after = before - weights
        pool = int((after - before * (1 - args.mem_fraction_static)) * 2**30 // cell // 64 * 64)
        self.pool = min(pool, args.max_total_tokens) if args.max_total_tokens else pool
        stamp = time.strftime("[%Y-%m-%d %H:%M:%S]")
        print(f"{stamp} server_args=ServerArgs(model_path='stub', mem_fraction_static={args.mem_fraction_static},"
              f" chunked_prefill_size={args.chunked_prefill_size})")
        self.stride = args.index_cache_decode_stride
        stride = f"; decode stride {self.stride} (effective {self.stride:.2f})" if self.stride > 1 else ""
        if self.calibration or pattern:
            print(f"{stamp} IndexCache: pattern {self.pattern} ({self.pattern.count('F')}/{layers} indexers kept){stride}")
        if self.stride > 1:
            print(f"{stamp} IndexCache: decode stride {self.stride}: top-k store for layers 0: 1 layers x 33 request slots")
            print(f"{stamp} IndexCache: decode stride {self.stride}: capturing 2 decode graphs per batch size")
        print(f"{stamp} Load weight begin. avail mem={before:.2f} GB")
        print(f"{stamp} Load weight end. elapsed=0.50 s, type=GlmMoeDsaForCausalLM, avail mem={after:.2f} GB,"
              f" mem usage={weights:.2f} GB.")
        print(f"{stamp} KV Cache is allocated. dtype: torch.{args.kv_cache_dtype}, #tokens: {self.pool}, KV size:"
              f" {self.pool * cell / 2**30:.2f} GB")
        print(f"{stamp} max_total_num_tokens={self.pool}, chunked_prefill_size={args.chunked_prefill_size},"
              f" max_prefill_tokens=16384, max_running_requests={args.max_running_requests}, context_len=202752,"
              f" available_gpu_mem=20.00 GB", flush=True)
        self.set_itl()
        self.admitted = threading.Condition(self.lock)
        self.backend, self.loading = None, threading.Lock()

    def model(self):
        """The ``--stub-model`` backend under the current pattern (loaded once, at the first need)."""
        with self.loading:
            if self.backend is None:
                from sglang_indexcache.calibration.backend import TransformersBackend

                self.backend = TransformersBackend.from_pretrained(self.args.stub_model)
            if self.backend.pattern != self.pattern:
                self.backend.set_pattern(self.pattern)
            return self.backend

    def set_itl(self):  # every kept indexer adds 0.1 ms to a step, divided by the decode stride
        self.itl = 0.004 + 0.0001 * self.pattern.count("F") / self.stride

    def topk(self, tokens, prompt):
        """A captured top-k ``[tokens, layers, k]`` that follows the reuse rule (positions as slots)."""
        k, layers, rng = int(os.environ.get("STUB_TOPK", "2048")), len(self.pattern), random.Random(tokens)
        rows, fresh = array("i"), {}
        for t in range(tokens):
            for layer, c in enumerate(self.pattern):
                if c == "S":
                    source = max(i for i in range(layer) if self.pattern[i] == "F")
                    rows.extend(rows[(t * layers + source) * k:(t * layers + source + 1) * k])
                    continue
                d = (t - prompt) % self.stride if t >= prompt else 0
                if d == 0:
                    fresh[layer] = rng.sample(range(t + 1), min(k, t + 1)) + [-1] * max(0, k - t - 1)
                    rows.extend(fresh[layer])
                else:
                    rows.extend(fresh[layer][:k - d] + list(range(t - d + 1, t + 1)))
        return base64.b64encode(rows.tobytes()).decode()

    def line(self, text):
        print(time.strftime("[%Y-%m-%d %H:%M:%S] ") + text, flush=True)

    def ticker(self):  # a decode line every 2 steps while requests run
        while True:
            time.sleep(2 * self.itl)
            with self.lock:
                n, q = self.active, self.queued
            if n:
                self.line(f"Decode batch, #running-req: {n}, #token: {self.used}, token usage: 0.10, cuda graph: True,"
                          f" gen throughput (token/s): {n / self.itl:.2f}, #queue-req: {q}")

    def logprobs(self, ids):
        chunk = self.args.chunked_prefill_size
        shared = "S" in self.pattern
        out = [None]
        for i in range(1, len(ids)):
            value = -8.0 + 0.01 * ((ids[i] * 7 + i) % 13) + (0.05 * math.sin(i) if shared and i >= 64 else 0.0)
            out.append(value + (1e-4 if (i // chunk) % 2 else 0.0))
        return [[v, t, None] for v, t in zip(out, ids)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, body, kind="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _admin(self):
        return self.headers.get("Authorization") == f"Bearer {ADMIN}"

    def do_GET(self):
        s = self.server
        if self.path == "/health":
            return self._send(200, "")
        if self.path == "/server_info":
            info = {"model_path": "stub", "disable_radix_cache": True, "decode_log_interval": 8,
                    "chunked_prefill_size": s.args.chunked_prefill_size, "kv_cache_dtype": s.args.kv_cache_dtype,
                    "mem_fraction_static": s.args.mem_fraction_static, "load_format": s.args.load_format}
            if s.args.stub_tree == "patched" and ("S" in s.pattern or s.stride > 1) or s.calibration:
                info["index_cache"] = {"pattern": s.pattern, "kept_indexers": s.pattern.count("F"),
                                       "decode_stride": str(s.stride)}
            return self._send(200, info)
        if self.path == "/metrics":
            return self._send(200, f"sglang:index_cache_kept_indexers {s.pattern.count('F')}.0\n"
                                   f"sglang:index_cache_decode_stride {float(s.stride)}\n", "text/plain")
        if self.path == "/index_cache" and s.calibration:
            if not self._admin():
                return self._send(401, {})
            return self._send(200, {"pattern": s.pattern, "calibration": True})
        return self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/index_cache/pattern" and s.calibration:
            if not self._admin():
                return self._send(401, {})
            s.pattern = body["pattern"]
            s.set_itl()
            s.line(f"IndexCache: switched to pattern {s.pattern}")
            return self._send(200, {"pattern": s.pattern})
        if self.path == "/index_cache/stride" and (s.calibration or s.args.index_cache_decode_stride > 1):
            if not self._admin():
                return self._send(401, {})
            s.stride = body["decode_stride"]
            s.set_itl()
            s.line(f"IndexCache: switched to decode stride {s.stride} (effective {s.stride:.2f})")
            return self._send(200, {"pattern": s.pattern, "decode_stride": str(s.stride)})
        ids, params = body["input_ids"], body["sampling_params"]
        if s.args.stub_model and not body.get("stream"):
            from fake_sglang import generate_reply

            return self._send(200, generate_reply(s.model(), body, s.args.stub_delay))
        if not body.get("stream"):
            new = params.get("max_new_tokens", 1)
            meta = {"prompt_tokens": len(ids), "completion_tokens": new}
            if body.get("return_logprob"):
                meta["input_token_logprobs"] = s.logprobs(ids)
            if body.get("return_indexer_topk"):
                meta["indexer_topk"] = s.topk(len(ids) + new - 1, len(ids))
            return self._send(200, {"output_ids": [7] * new, "meta_info": meta})
        need = math.ceil(len(ids) / 64) * 64 + params["max_new_tokens"] + 1
        with s.admitted:
            s.queued += 1
            while s.used + need > s.pool or s.active >= s.args.max_running_requests - 1:
                s.admitted.wait()
            s.queued -= 1
            s.used += need
            s.active += 1
            s.line(f"Prefill batch, #new-seq: 1, #new-token: {len(ids)}, #cached-token: 0, token usage: 0.10,"
                   f" #running-req: {s.active - 1}, #queue-req: {s.queued}")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            time.sleep(1e-7 * len(ids))
            for k in range(params["max_new_tokens"]):
                if k:
                    time.sleep(s.itl)
                meta = {"prompt_tokens": len(ids), "completion_tokens": k + 1, "cached_tokens": 0}
                self._chunk(b"data: " + json.dumps({"output_ids": [7] * (k + 1), "meta_info": meta}).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        finally:
            with s.admitted:
                s.active -= 1
                s.used -= need
                s.admitted.notify_all()

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


if __name__ == "__main__":
    stub = Stub(options(sys.argv[1:]))
    threading.Thread(target=stub.ticker, daemon=True).start()
    stub.serve_forever()
