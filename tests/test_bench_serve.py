"""`indexcache bench serve` / `serve-report` against a stdlib stub of SGLang's HTTP server (CPU, fast).

The stub implements ``GET /health``, ``GET /server_info`` and streamed ``POST /generate`` the way
SGLang 0.5.17 answers under ``--skip-tokenizer-init`` (``data: {"output_ids": [...], "meta_info":
{...}}`` lines, cumulative ids, ``data: [DONE]``, chunked transfer encoding), with a controllable prefill delay per prompt token
and a fixed inter-token delay, and appends SGLang-format ``Prefill batch`` / ``Decode batch`` lines
to a log file while it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_indexcache.bench import serve_log, serve_run
from sglang_indexcache.bench.serve import Client, PromptMaker, Sample, decode_stats
from sglang_indexcache.cli import main

# the format of SGLang 0.5.17's metrics_reporter.py (report_decode_stats / report_prefill_stats)
DECODE_LINE = ("[2026-12-02 10:11:{s:02d}{rank}] Decode batch{it}, #running-req: {n}, #token: {tok}, token usage: 0.45,"
               " cuda graph: True, gen throughput (token/s): {tps:.2f}, #queue-req: 0")
PREFILL_LINE = ("[2026-12-02 10:11:{s:02d}] Prefill batch, #new-seq: 1, #new-token: 16384, #cached-token: 0,"
                " #token: 16384, token usage: 0.01, #running-req: {n}, #queue-req: 0, #pending-token: 0,"
                " cuda graph: False, input throughput (token/s): 41250.20")


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, prefill_s_per_token=2e-5, prefill_base_s=0.01, itl_s=0.02, log_path=None, max_running=64):
        super().__init__(("127.0.0.1", 0), Handler)
        self.prefill_s_per_token, self.prefill_base_s, self.itl_s = prefill_s_per_token, prefill_base_s, itl_s
        self.slots = threading.Semaphore(max_running)  # SGLang may run fewer requests at once than sent
        self.bodies, self.lock, self.active = [], threading.Lock(), 0
        self.fail = {}  # first token -> "http500" | "stream-error" | "short" | "hang" | "drip"
        self.log_path = log_path
        self._stop = threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def log(self, line):
        if self.log_path:
            with self.lock, open(self.log_path, "a") as handle:
                handle.write(line + "\n")

    def ticker(self):  # a decode line every 2 x ITL: running streams and their aggregate rate
        while not self._stop.wait(2 * self.itl_s):
            with self.lock:
                n = self.active
            if n:
                self.log(DECODE_LINE.format(s=0, rank="", it="", n=n, tok=n * 1000, tps=n / self.itl_s))

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        threading.Thread(target=self.ticker, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # streams go out chunked, as uvicorn sends SGLang's StreamingResponse

    def log_message(self, *args):
        pass

    def _json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
        elif self.path == "/server_info":
            self._json(200, {"model_path": "/models/glm5-dsa-4l", "disable_radix_cache": True,
                             "decode_log_interval": 2, "version": "0.5.17-stub", "internal_states": [{}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self):
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids, params = body["input_ids"], body["sampling_params"]
        with s.lock:
            s.bodies.append(body)
        if not body.get("stream"):
            return self._json(400, {"error": "this stub only streams; the client must not send stream=false"})
        fail = s.fail.get(ids[0])
        if fail == "http500":
            return self._json(500, {"error": {"message": "injected failure"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        s.log(PREFILL_LINE.format(s=0, n=s.active))
        time.sleep(s.prefill_base_s + s.prefill_s_per_token * len(ids))
        if fail == "hang":
            time.sleep(5)
        new = params["max_new_tokens"] - (1 if fail == "short" else 0)
        out = []
        s.slots.acquire()
        with s.lock:
            s.active += 1
        try:
            for k in range(new):
                if k:
                    time.sleep(0.3 if fail == "drip" else s.itl_s)
                if fail == "stream-error" and k == 2:
                    self._send({"error": {"message": "injected stream error", "code": 500}})
                    break
                out.append(7)
                meta = {"id": "r", "finish_reason": None if k + 1 < new else {"type": "length"},
                        "prompt_tokens": len(ids), "completion_tokens": k + 1, "cached_tokens": 0}
                self._send({"output_ids": out, "meta_info": meta})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except OSError:  # the client gave up (timeout)
            pass
        finally:
            with s.lock:
                s.active -= 1
            s.slots.release()

    def _send(self, obj):
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


SPEC = dict(lengths=[256, 1024], prefill_repeats=2, decodes=[(4, 512)], decode_tokens=20, warmup_length=64)


def test_ttft_itl_and_server_log(tmp_path):
    log_path = tmp_path / "server.log"
    # lines already in the log (an earlier run) must not count
    log_path.write_text(DECODE_LINE.format(s=1, rank="", it="", n=4, tok=1, tps=99999.0) * 1 + "\n")
    with Stub(log_path=log_path) as stub:
        spec = serve_run.ServeSpec(tag="t", server_log=str(log_path), **SPEC)
        doc = serve_run.run(spec, Client(stub.url, timeout_s=10))
    assert doc["lost"] == {"requests": 9, "lost": 0, "errors": [], "cached_hits": 0}
    for row in doc["prefill"]:
        expected = 0.01 + 2e-5 * row["length"]
        assert expected <= row["ttft_s"]["min"] <= row["ttft_s"]["median"] < expected + 0.1
        assert [s["completion_tokens"] for s in row["samples"]] == [1, 1]
    client = doc["decode"][0]["client"]
    assert client["measured"] == 4
    assert 0.02 <= client["itl_median_s"] < 0.03
    assert 4 / 0.03 < client["tok_s"] <= 4 / 0.02 * 1.05
    server = doc["decode"][0]["server_log"]
    assert server["steady_lines"] >= 3 and 99999.0 not in server["tok_s"]
    assert server["tok_s_median"] == pytest.approx(4 / 0.02)
    assert server["decode_log_interval"] == 2 and server["cuda_graph"] is True
    assert server["running_reached"] == 4 and "note" not in server
    assert server["step_ms_median"] == pytest.approx(20.0)  # 4 running / (4 / 0.02 s) tok/s


def test_prompts_share_no_prefix(tmp_path):
    with Stub(itl_s=0.005) as stub:
        spec = serve_run.ServeSpec(tag="every-4", **SPEC)
        serve_run.run(spec, Client(stub.url, timeout_s=10))
        bodies = stub.bodies
    firsts = [b["input_ids"][0] for b in bodies]
    assert len(firsts) == 9 and len(set(firsts)) == 9
    lengths = sorted(len(b["input_ids"]) for b in bodies)
    assert lengths == [64, 256, 256, 512, 512, 512, 512, 1024, 1024]
    for b in bodies:
        assert b["sampling_params"] == {"max_new_tokens": b["sampling_params"]["max_new_tokens"],
                                        "temperature": 0.0, "ignore_eos": True}
        assert all(1 <= t < 4000 for t in b["input_ids"])
    # the tag salts every seed: another tag's prompts differ, the same tag's repeat exactly
    a, b = PromptMaker(0, "every-4", 4000, 3), PromptMaker(0, "all-F", 4000, 3)
    assert a.make("prefill", 128, 0) != b.make("prefill", 128, 0)
    assert PromptMaker(0, "x", 4000, 2).make("decode", 50, 1) == PromptMaker(0, "x", 4000, 2).make("decode", 50, 1)


def test_failures_are_counted_not_raised(tmp_path):
    with Stub(itl_s=0.005) as stub:
        maker = PromptMaker(0, "f", 4000, 9)  # the same first tokens the run will draw, in order
        firsts = [maker.make("x", 2, i)[0] for i in range(9)]
        # warm-up 0; prefill 256: 1, 2; prefill 1024: 3, 4; decode 5..8
        stub.fail = {firsts[1]: "http500", firsts[4]: "hang", firsts[5]: "stream-error", firsts[6]: "short",
                     firsts[7]: "drip"}
        rc = main(["--quiet", "bench", "serve", "--url", stub.url, "--tag", "f", "--lengths", "256,1024",
                   "--decode-batch", "4", "--decode-length", "512", "--decode-tokens", "8",
                   "--warmup-length", "64", "--timeout", "1", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "serve_f.json").read_text())
    assert doc["lost"]["lost"] == 5 and doc["lost"]["requests"] == 9
    assert [r["lost"] for r in doc["prefill"]] == [1, 1] and doc["decode"][0]["lost"] == 3
    errors = " | ".join(doc["lost"]["errors"])
    assert "HTTP 500" in errors and "injected stream error" in errors and "returned 7 of 8" in errors
    assert "TimeoutError: timed out" in errors  # no data for --timeout seconds
    assert "timed out: still streaming after 1 s" in errors  # data, but longer than --timeout in all
    assert doc["prefill"][0]["ttft_s"]["min"] is not None  # the other request of that length still counts
    assert doc["decode"][0]["client"]["measured"] == 1


def test_decode_stats_window_and_itl():
    def sample(sent, chunks):
        s = Sample(prompt_len=10, new_tokens=chunks[-1][1], first_token=1, sent=sent)
        s.chunks = chunks
        return s

    # request a: first token at 1.0, then one token every 0.1 s; b: first at 1.5 (its prefill came
    # later), then every 0.1 s, one chunk bringing two tokens (split evenly)
    a = sample(0.0, [(1.0 + 0.1 * k, k + 1) for k in range(20)])  # tokens at 1.0 .. 2.9
    b = sample(0.0, [(1.5, 1), (1.6, 2), (1.8, 4)] + [(1.8 + 0.1 * k, 4 + k) for k in range(1, 10)])  # .. 2.7
    stats = decode_stats([a, b])
    assert stats["window_s"] == pytest.approx(1.2)  # 1.5 .. 2.7
    assert stats["itl_median_s"] == pytest.approx(0.1)
    assert stats["tok_s"] == pytest.approx(24 / 1.2)  # a: 1.6..2.7 (12 tokens), b: 1.6..2.7 (12 tokens)
    assert stats["tok_s_median_itl"] == pytest.approx(20.0)
    assert a.ttft == pytest.approx(1.0)
    failed = sample(0.0, [(0.5, 1), (0.6, 2)])
    failed.error = "HTTP 500"
    assert decode_stats([a, b, failed])["measured"] == 2
    apart = decode_stats([sample(0.0, [(1.0, 1), (1.1, 2)]), sample(0.0, [(2.0, 1), (2.1, 2)])])
    assert apart["tok_s"] is None and "never all decoded" in apart["note"]


def test_log_parser_real_format():
    lines = [
        DECODE_LINE.format(s=0, rank="", it="", n=7, tok=1, tps=70.0),     # batch not yet full
        PREFILL_LINE.format(s=1, n=7),                                    # the 8th request's prefill
        DECODE_LINE.format(s=2, rank="", it="", n=8, tok=1, tps=20.0),     # window holds that prefill
        DECODE_LINE.format(s=3, rank=" TP0", it="", n=8, tok=1, tps=300.0),
        DECODE_LINE.format(s=4, rank="", it=" [1234]", n=8, tok=1, tps=310.0),
        "[2026-12-02 10:11:05] INFO:     127.0.0.1:5000 - \"POST /generate HTTP/1.1\" 200 OK",
        DECODE_LINE.format(s=6, rank="", it="", n=8, tok=1, tps=320.0),
        DECODE_LINE.format(s=7, rank="", it="", n=5, tok=1, tps=250.0),    # requests finishing
    ]
    events = serve_log.parse_lines("\n".join(lines))
    assert [e["kind"] for e in events] == ["decode", "prefill", "decode", "decode", "decode", "decode", "decode"]
    kept = serve_log.steady_decode_lines(events, 8)
    assert [e["tok_s"] for e in kept] == [300.0, 310.0, 320.0]
    summary = serve_log.summarize("\n".join(lines), 8, 40)
    assert summary["tok_s_median"] == 310.0 and summary["steady_lines"] == 3
    assert summary["first_time"] == "2026-12-02 10:11:03" and summary["cuda_graph"] is True
    assert serve_log.summarize("no sglang here", 8)["tok_s_median"] is None


def _run_tag(stub, tmp_path, tag):
    return main(["--quiet", "bench", "serve", "--url", stub.url, "--tag", tag, "--lengths", "1024,4096",
                 "--prefill-repeats", "1", "--decode-batch", "2", "--decode-length", "256",
                 "--decode-tokens", "6", "--warmup-length", "32", "--out", str(tmp_path)])


def test_report_speedups_and_baseline(tmp_path, capsys):
    with Stub(prefill_s_per_token=4e-5, itl_s=0.02) as slow:
        assert _run_tag(slow, tmp_path, "stock-all-F") == 0
    with Stub(prefill_s_per_token=2e-5, prefill_base_s=0.005, itl_s=0.01) as fast:
        assert _run_tag(fast, tmp_path, "every-4") == 0
    out, png = tmp_path / "table.md", tmp_path / "ttft.png"
    assert main(["bench", "serve-report", str(tmp_path), "--baseline", "stock-all-F", "--out", str(out),
                 "--plot", str(png)]) == 0
    text = out.read_text()
    assert "Baseline: **stock-all-F**" in text and "| stock-all-F (baseline) | every-4 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4,096 |"))
    ratio = float(row.split("(")[-1].split("x")[0])
    assert 1.6 < ratio < 2.1  # (0.01 + 0.164) / (0.005 + 0.082) = 2.0, less the HTTP overhead
    decode = next(line for line in text.splitlines() if line.startswith("| client tok/s"))
    assert 1.5 < float(decode.split("(")[-1].split("x")[0]) < 2.2
    assert png.stat().st_size > 1000
    capsys.readouterr()
    assert main(["bench", "serve-report", str(tmp_path), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'nope' is not among the tags read" in err and "stock-all-F" in err


@pytest.mark.parametrize("argv, message", [
    (["--url", "ftp://h"], "is not an http(s)://HOST[:PORT] address"),
    (["--url", "http://127.0.0.1:9"], "is not answering /health"),
    (["--lengths", "32k,x"], "--lengths: 'x' is not an integer"),
    (["--lengths", "0"], "--lengths must be positive"),
    (["--warmup-length", "1,2"], "--warmup-length takes one length"),
    (["--decode-batch", "8,32", "--decode-length", "1,2,3"], "--decode-batch gives 2 setups but --decode-length 3"),
    (["--prefill-repeats", "2,1"], "--prefill-repeats gives 2 counts for 4 --lengths"),
    (["--pattern", "SFFF"], "--pattern: layer 0 must be F"),
    (["--tag", "a b"], "--tag 'a b'"),
    (["--server-log", "missing.log"], "--server-log missing.log: no such file"),
])
def test_bad_flags_exit_2(tmp_path, capsys, argv, message):
    base = {"--tag": "t", "--out": str(tmp_path / "o"), "--url": "http://127.0.0.1:9"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    rc = main(["bench", "serve"] + [x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_serve_path_imports_no_torch():
    """The client runs on the GPU host with plain python3: no torch, numpy or SGLang on its path."""
    code = ("import sys; from sglang_indexcache.cli import build_parser; build_parser();"
            " import sglang_indexcache.bench.serve_run, sglang_indexcache.bench.serve_report;"
            " print([m for m in ('torch', 'numpy', 'sglang', 'tqdm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
