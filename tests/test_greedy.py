"""Greedy calibration: exact versus a naive search, cheaper, resumable, clear on NaN; the server backend
(plain, requests in flight, screened, stopped and resumed inside a step) against the in-process search."""

import json
import re
import time

import pytest
import torch

from dsa_models import micro_model
from fake_sglang import FakeSGLang, StubServer
from sglang_indexcache import pattern as pat
from sglang_indexcache.calibration import greedy
from sglang_indexcache.calibration.backend import TransformersBackend
from sglang_indexcache.calibration.data import TokenBlocks
from sglang_indexcache.calibration.evaluators import NonFiniteLossError
from sglang_indexcache.calibration.recorder import SearchStopped
from sglang_indexcache.calibration.paths import state_path
from sglang_indexcache.calibration.run import calibrate
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


def model_info(path):
    config = {"num_hidden_layers": LAYERS, "index_topk": TOPK, "index_n_heads": 4, "model_type": "glm_moe_dsa"}
    return ModelInfo(path, config, {f"model.layers.{i}.self_attn.indexer.wk.weight": [32, 64] for i in range(LAYERS)})


@pytest.fixture
def info(tmp_path):
    return model_info(tmp_path)


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


@pytest.fixture
def fake_server(backend):
    server = StubServer(TransformersBackend(micro_model(LAYERS, TOPK, seed=3, scale=3.0)))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def local_docs(backend, blocks, tmp_path_factory):
    """The in-process search (exact prefix reuse), plain and screened, for the server tests."""
    root = tmp_path_factory.mktemp("local")
    info = model_info(root)
    plain = calibrate(backend, blocks, info, 0.3, root / "local.json", batch_size=2, plot=False)
    screened = calibrate(backend, blocks, info, 0.3, root / "screened.json", batch_size=2, screen_batches=1,
                         screen_top=2, plot=False)
    return {"plain": plain, "screened": screened}


def same_search(served, local):
    """The same flips in the same order, the same losses (float32 forwards on either side)."""
    got, want = served["calibration"], local["calibration"]
    assert served["pattern"] == local["pattern"]
    assert [s["removed"] for s in got["steps"]] == [s["removed"] for s in want["steps"]]
    assert [s["loss"] for s in got["steps"]] == pytest.approx([s["loss"] for s in want["steps"]], rel=1e-5)


def test_server_backend_search_equals_in_process(backend, blocks, info, fake_server, local_docs, tmp_path):
    with pytest.raises(ServerError, match="API/admin key"):
        ServerBackend(fake_server)
    remote = ServerBackend(fake_server, api_key="secret", num_layers=LAYERS)
    backend.set_pattern(pat.FULL * LAYERS)
    assert remote.loss(blocks, 2).mean == pytest.approx(backend.loss(blocks, 2).mean, rel=1e-5)
    served = calibrate(remote, blocks, info, 0.3, tmp_path / "served.json", batch_size=2, plot=False)
    same_search(served, local_docs["plain"])
    cal = served["calibration"]
    assert cal["backend"] == "ServerBackend"
    assert cal["layer_forwards"] == cal["naive_layer_forwards"]
    # baseline + 6+5+4+3+2 candidates + uniform, 3 requests of 2 blocks each; one switch per pattern
    timings = cal["server_timings"]
    assert cal["evaluations"] == 20 and timings["requests"] == 3 * (1 + 20 + 1) + 3  # + the loss() above
    assert timings["prompt_tokens"] == timings["requests"] * 2 * SEQ and timings["switches"] >= 21
    assert FakeSGLang.max_active == 1


def test_server_search_in_flight_and_screened_equals_in_process(blocks, info, fake_server, local_docs, tmp_path):
    remote = ServerBackend(fake_server, api_key="secret", num_layers=LAYERS, in_flight=3)
    served = calibrate(remote, blocks, info, 0.3, tmp_path / "fast.json", batch_size=2, plot=False)
    same_search(served, local_docs["plain"])
    assert FakeSGLang.max_active >= 2  # the three requests of a candidate overlapped
    screened = calibrate(remote, blocks, info, 0.3, tmp_path / "screened.json", batch_size=2, screen_batches=1,
                         screen_top=2, plot=False)
    same_search(screened, local_docs["screened"])
    assert screened["calibration"]["options"] == {"screen_batches": 1, "screen_top": 2}


class InterruptedBackend(ServerBackend):
    """A server backend whose ``calls``-th /generate request never happens (Ctrl-C instead)."""

    calls = None

    def _score(self, input_ids):
        if self.calls is not None:
            self.calls -= 1
            if self.calls < 0:
                raise KeyboardInterrupt
        return super()._score(input_ids)


def test_server_search_stops_and_resumes_inside_a_step(blocks, info, fake_server, local_docs, tmp_path):
    out = tmp_path / "p.json"
    first = ServerBackend(fake_server, api_key="secret", num_layers=LAYERS)
    with pytest.raises(SearchStopped):  # a deadline already passed: the baseline, then stop
        calibrate(first, blocks, info, 0.3, out, batch_size=2, plot=False, max_seconds=0)
    saved = json.loads(state_path(out).read_text())
    assert saved["baseline_loss"] is not None and saved["steps"] == [] and saved["partial"]["results"] == {}
    second = InterruptedBackend(fake_server, api_key="secret", num_layers=LAYERS)
    second.calls = 3 + 2 * 3  # the resumed baseline, two candidates of step 1, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        calibrate(second, blocks, info, 0.3, out, resume=True, batch_size=2, plot=False)
    saved = json.loads(state_path(out).read_text())
    assert sorted(saved["partial"]["results"]) == ["5:0,1,2", "6:0,1,2"] and saved["evaluations"] == 2
    third = ServerBackend(fake_server, api_key="secret", num_layers=LAYERS, in_flight=2)
    resumed = calibrate(third, blocks, info, 0.3, out, resume=True, batch_size=2, plot=False)
    same_search(resumed, local_docs["plain"])
    # the two recorded candidates were not scored again: baseline + 18 candidates + uniform
    assert third.timings.requests == 3 * (1 + 18 + 1)
    assert resumed["calibration"]["evaluations"] == 20 and not state_path(out).exists()
    timings = resumed["calibration"]["server_timings"]
    assert timings["requests"] == 3 * (1 + 1 + 2 + 1 + 18 + 1)  # the three runs together


def test_server_backend_unreachable():
    with pytest.raises(ServerError, match="cannot reach"):
        ServerBackend("http://127.0.0.1:9", timeout_s=2)


def test_progress_line_gives_evaluations_best_loss_and_time_left(backend, blocks, info, tmp_path, monkeypatch,
                                                                 caplog):
    from sglang_indexcache import progress

    monkeypatch.setattr(progress, "QUIET", False)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.02)  # off a terminal: a line every 30 s, here faster
    layer = backend.layer  # slowed a little, so that the timer sees the search half done

    def slowed(*args, **kwargs):
        time.sleep(0.002)
        return layer(*args, **kwargs)

    monkeypatch.setattr(backend, "layer", slowed)
    few = TokenBlocks(blocks.input_ids[:4], "random", "sha256:few", 4 * SEQ)
    with caplog.at_level("INFO", logger="sglang_indexcache.progress"):
        calibrate(backend, few, info, 0.6, tmp_path / "p.json", batch_size=2, plot=False)  # 3 steps
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("candidates x batches")]
    pattern = (r"candidates x batches: \d+/\d+ fwd \(\d+%\), \w+ elapsed, about \w+ left"
               r" \[step \d: layer \d of 3; \d+ evaluations, step best \d\.\d{5} \(layer \d S\)\]")
    assert any(re.fullmatch(pattern, line) for line in lines), lines[:5]


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


def test_load_server_backend_reads_the_served_checkpoint(fake_server):
    """calibrate --url's backend: the server, with the tokenizer and config of the checkpoint it serves."""
    from sglang_indexcache.calibration.session import load_server_backend
    from sglang_indexcache.configs import TINY_MODEL_DIR

    backend, tokenizer, config = load_server_backend(fake_server, TINY_MODEL_DIR, LAYERS, api_key="secret",
                                                     in_flight=2)
    assert isinstance(backend, ServerBackend) and backend.in_flight == 2 and backend.num_layers == LAYERS
    assert config.num_hidden_layers == 12 and tokenizer("def f():")["input_ids"]
