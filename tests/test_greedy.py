"""Greedy calibration: exact versus a naive search, cheaper, resumable, clear on NaN; server backend."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dsa_models import micro_model
from sglang_indexcache import pattern as pat
from sglang_indexcache.calibration import greedy
from sglang_indexcache.calibration.backend import TransformersBackend
from sglang_indexcache.calibration.data import TokenBlocks
from sglang_indexcache.calibration.evaluators import NonFiniteLossError
from sglang_indexcache.calibration.run import calibrate, state_path
from sglang_indexcache.calibration.server_backend import ServerBackend, ServerError
from sglang_indexcache.model_info import ModelInfo

LAYERS, TOPK, SEQ = 7, 4, 24


@pytest.fixture(scope="module")
def backend():
    # scale 3: sharper indexer scores, so candidate losses are well separated
    return TransformersBackend(micro_model(LAYERS, TOPK, seed=3, scale=3.0))


@pytest.fixture(scope="module")
def blocks():
    ids = torch.randint(0, 300, (6, SEQ), generator=torch.Generator().manual_seed(5))
    return TokenBlocks(ids, "random", "sha256:test", ids.numel())


@pytest.fixture
def info(tmp_path):
    config = {"num_hidden_layers": LAYERS, "index_topk": TOPK, "index_n_heads": 4, "model_type": "glm_moe_dsa"}
    return ModelInfo(tmp_path, config, {f"model.layers.{i}.self_attn.indexer.wk.weight": [32, 64] for i in range(LAYERS)})


def naive_greedy(backend, ids, keep, batch_size):
    """The paper's search, written plainly: a whole forward for every candidate."""
    pattern = pat.FULL * backend.num_layers
    backend.set_pattern(pattern)
    baseline, steps = backend.loss(ids, batch_size).mean, []
    while pattern.count(pat.FULL) > greedy.target_full(backend.num_layers, keep):
        best = None
        for j in pat.full_layers(pattern)[1:]:
            backend.set_pattern(pattern[:j] + "S" + pattern[j + 1:])
            loss = backend.loss(ids, batch_size).mean
            if best is None or loss < best[1]:
                best = (j, loss)
        pattern = pattern[:best[0]] + "S" + pattern[best[0] + 1:]
        steps.append((best[0], best[1], pattern))
    backend.set_pattern(pat.FULL * backend.num_layers)
    return baseline, steps


@pytest.mark.parametrize("keep", [0.3, 0.15])  # 2 F of 7 (5 steps); 1 F (6 steps, down to layer 0 only)
def test_fast_greedy_equals_naive(backend, blocks, keep):
    baseline, steps = naive_greedy(backend, blocks.input_ids, keep, batch_size=2)
    batches = list(blocks.batches(2))
    evaluator = greedy.make_evaluator(backend, batches)
    state = greedy.new_state(keep, {}, start_pattern=pat.FULL * LAYERS)
    greedy.run_search(evaluator, state, greedy.target_full(LAYERS, keep), len(batches))
    assert [s["pattern"] for s in state["steps"]] == [s[2] for s in steps]
    assert state["baseline_loss"] == pytest.approx(baseline, rel=1e-6)
    for got, want in zip(state["steps"], steps):
        assert got["removed"] == want[0] and got["loss"] == pytest.approx(want[1], rel=1e-6)
    assert state["layer_forwards"] < state["naive_layer_forwards"]
    naive = len(batches) * LAYERS * (1 + sum(range(LAYERS - 1, LAYERS - 1 - len(steps), -1)))
    assert state["naive_layer_forwards"] == naive


def test_ties_go_to_the_lowest_layer():
    assert greedy.choose({5: (1.0, 0, 0), 2: (1.0, 0, 0), 3: (1.5, 0, 0)}) == 2


def test_resume_after_interrupt_reaches_the_same_pattern(backend, blocks, info, tmp_path):
    out_full, out = tmp_path / "full.json", tmp_path / "p.json"
    full = calibrate(backend, blocks, info, 0.3, out_full, batch_size=2, plot=False)

    def interrupt(state):
        if len(state["steps"]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(backend, blocks, info, 0.3, out, batch_size=2, plot=False, on_step=interrupt)
    saved = json.loads(state_path(out).read_text())
    assert len(saved["steps"]) == 2 and not out.exists()
    from sglang_indexcache.errors import UsageError
    with pytest.raises(UsageError, match="--resume"):
        calibrate(backend, blocks, info, 0.3, out, batch_size=2, plot=False)
    with pytest.raises(UsageError, match="keep_ratio"):
        calibrate(backend, blocks, info, 0.5, out, resume=True, batch_size=2, plot=False)
    resumed = calibrate(backend, blocks, info, 0.3, out, resume=True, batch_size=2)
    assert resumed["pattern"] == full["pattern"]
    assert [s["loss"] for s in resumed["calibration"]["steps"]] == pytest.approx(
        [s["loss"] for s in full["calibration"]["steps"]], rel=1e-9)
    assert not state_path(out).exists() and (tmp_path / "p.calibration.png").stat().st_size > 0
    cal = resumed["calibration"]
    assert cal["method"] == "greedy" and cal["data"]["tokens"] == blocks.tokens
    assert cal["uniform"]["pattern"] == pat.uniform(LAYERS, 3)


def test_nan_stops_with_layer_and_step(blocks, info, tmp_path):
    broken = TransformersBackend(micro_model(LAYERS, TOPK, seed=3))
    with torch.no_grad():
        broken.model.model.layers[4].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 0 .*layer 4 produced non-finite"):
        calibrate(broken, blocks, info, 0.3, tmp_path / "p.json", batch_size=2, plot=False)


def test_screening_option_is_recorded(backend, blocks, info, tmp_path):
    doc = calibrate(backend, blocks, info, 0.3, tmp_path / "s.json", batch_size=2, screen_batches=1,
                    screen_top=2, plot=False)
    assert doc["calibration"]["options"] == {"screen_batches": 1, "screen_top": 2}
    assert doc["pattern"].count("F") == 2


class FakeSGLang(BaseHTTPRequestHandler):
    """The endpoint contract of a patched SGLang server in calibration mode, scored by a backend."""

    backend = None
    key = "secret"

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
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/index_cache/pattern":
            self.backend.set_pattern(body["pattern"])
            self._send(200, {"pattern": self.backend.pattern})
        elif self.path == "/generate":
            assert body["return_logprob"] and body["logprob_start_len"] == 0
            ids = torch.tensor(body["input_ids"])
            with torch.no_grad():
                logp = self.backend.model(ids).logits.float().log_softmax(-1)
            picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            outs = [{"text": "x", "meta_info": {"input_token_logprobs":
                     [[None, int(r[0]), None]] + [[float(v), int(t), None] for v, t in zip(p, r[1:])]}}
                    for p, r in zip(picked.tolist(), ids.tolist())]
            self._send(200, outs)
        else:
            self._send(404, {"error": "no route"})


@pytest.fixture
def fake_server(backend):
    FakeSGLang.backend = TransformersBackend(micro_model(LAYERS, TOPK, seed=3, scale=3.0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_server_backend_search_equals_in_process(backend, blocks, info, fake_server, tmp_path):
    with pytest.raises(ServerError, match="API/admin key"):
        ServerBackend(fake_server)
    remote = ServerBackend(fake_server, api_key="secret", num_layers=LAYERS)
    backend.set_pattern(pat.FULL * LAYERS)
    assert remote.loss(blocks, 2).mean == pytest.approx(backend.loss(blocks, 2).mean, rel=1e-5)
    local = calibrate(backend, blocks, info, 0.3, tmp_path / "local.json", batch_size=2, plot=False)
    served = calibrate(remote, blocks, info, 0.3, tmp_path / "served.json", batch_size=2, plot=False)
    assert served["pattern"] == local["pattern"]
    assert served["calibration"]["loss"] == pytest.approx(local["calibration"]["loss"], rel=1e-5)
    assert served["calibration"]["backend"] == "ServerBackend"
    assert served["calibration"]["layer_forwards"] == served["calibration"]["naive_layer_forwards"]


def test_server_backend_unreachable():
    with pytest.raises(ServerError, match="cannot reach"):
        ServerBackend("http://127.0.0.1:9", timeout_s=2)


def naive_stride_greedy(backend, ids, pattern, target, levels, batch_size):
    """The stride search written plainly: a whole forward for every candidate raise."""
    backend.set_pattern(pattern)
    strides, steps = [1] * backend.num_layers, []
    backend.set_decode_stride(strides)
    baseline = backend.loss(ids, batch_size).mean
    while pat.effective_stride(pattern, strides) < target:
        best = None
        for j in pat.full_layers(pattern):
            if strides[j] == levels[-1]:
                continue
            trial = list(strides)
            trial[j] = min(v for v in levels if v > strides[j])
            backend.set_decode_stride(trial)
            loss = backend.loss(ids, batch_size).mean
            if best is None or loss < best[1]:
                best = (j, loss, trial)
        strides = best[2]
        steps.append(best)
    backend.set_decode_stride(1)
    backend.set_pattern(pat.FULL * backend.num_layers)
    return baseline, steps


def test_fast_stride_search_equals_naive(backend, blocks):
    from sglang_indexcache.calibration.moves import StrideMoves

    pattern, target, levels = "FFSFSSF", 3.0, (1, 2, 4, 8)
    baseline, steps = naive_stride_greedy(backend, blocks.input_ids, pattern, target, levels, batch_size=2)
    batches = list(blocks.batches(2))
    evaluator = greedy.make_evaluator(backend, batches, moves=StrideMoves(pattern, levels))
    state = greedy.new_state(None, {}, start_pattern=pattern)
    state["decode_stride"] = [1] * LAYERS
    greedy.run_search(evaluator, state, target, len(batches))
    backend.set_decode_stride(1)
    backend.set_pattern(pat.FULL * LAYERS)
    assert state["pattern"] == pattern and state["baseline_loss"] == pytest.approx(baseline, rel=1e-6)
    assert [(s["raised"], s["decode_stride"]) for s in state["steps"]] == [(j, trial) for j, _, trial in steps]
    assert [s["loss"] for s in state["steps"]] == pytest.approx([loss for _, loss, _ in steps], rel=1e-6)
    assert pat.effective_stride(pattern, state["decode_stride"]) >= target
    assert state["layer_forwards"] < state["naive_layer_forwards"]


def test_stride_search_resumes(backend, blocks, info, tmp_path):
    from sglang_indexcache.calibration.stride_search import calibrate_stride

    full = calibrate_stride(backend, blocks, info, "FSFSFSF", 2.0, tmp_path / "a.json", batch_size=2, plot=False)

    def interrupt(state):
        if len(state["steps"]) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        calibrate_stride(backend, blocks, info, "FSFSFSF", 2.0, out, batch_size=2, plot=False, on_step=interrupt)
    assert json.loads(state_path(out).read_text())["decode_stride"] == full["decode_stride_calibration"]["steps"][1]["decode_stride"]
    resumed = calibrate_stride(backend, blocks, info, "FSFSFSF", 2.0, out, resume=True, batch_size=2, plot=False)
    assert resumed["decode_stride"] == full["decode_stride"] and not state_path(out).exists()
    assert resumed["decode_stride_calibration"]["loss"] == pytest.approx(full["decode_stride_calibration"]["loss"])
    assert backend.decode_stride == [1] * LAYERS and backend.pattern == pat.FULL * LAYERS  # left as it was
