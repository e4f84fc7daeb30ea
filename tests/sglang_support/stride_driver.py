"""The decode stride's SGLang side on the CPU (0.5.17 or 0.5.23), for test_sglang_decode_stride.py.

``TRITON_INTERPRET=1 python stride_driver.py RESULTS.json`` with a patched tree on PYTHONPATH. Real
SGLang pieces: ``ReqToTokenPool`` (allocation bumps a row's generation; 0.5.17's ``clear`` zeroes
them), ``Req``, ``ScheduleBatch``, ``ForwardMode``, the ``DSATopKBackend.TORCH`` top-k that the
refresh calls, ``envs``, the capture-mode switches and the decode CUDA-graph runner's own label
methods; the merge runs our Triton kernel in the interpreter. Stand-ins: the model runner (the
pool, ``index_topk``), the indexer (records the index keys a reuse step stores), the indexer
metadata (page table, lengths) and the ForwardBatch (rows, lengths).

The life-cycle scenario decodes requests that join, finish, are aborted, retracted (and join again
with a new row) and take over freed rows, and records per request and F layer every top-k it was
served, with the logits of each step, for the test to check against its own rule.
"""

from __future__ import annotations

import json
import os
import random
import sys
from types import SimpleNamespace

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"

import torch  # noqa: E402

K, PAGE, STRIDE, POOL_ROWS, CONTEXT = 8, 4, 4, 4, 512
PATTERN = "FSSSFSSS"
F_LAYERS = (0, 4)


class Indexer:
    """What the hooks call on SGLang's Indexer: the key stores of a reuse step."""

    index_topk = K
    use_dsa_indexer_fusion = False

    def __init__(self):
        self.stored = []

    def _forward_cuda_k_only(self, x, positions, forward_batch, layer_id, act_quant, metadata, return_indices=True):
        assert return_indices is False
        self.stored.append([layer_id, positions.tolist()])

    def _get_k_bf16(self, x, positions):
        return positions

    def _store_index_k_cache(self, forward_batch, layer_id, key, act_quant=None):
        self.stored.append([layer_id, key.tolist()])


class Metadata:
    def __init__(self, page_table, seq_lens, fused: bool):
        from sglang.srt.layers.attention.dsa.dsa_topk_backend import DSATopKBackend

        self.page_table, self.seq_lens = page_table, seq_lens
        self.force_unfused_topk = not fused
        self.topk_backend = DSATopKBackend.TORCH
        self.attn_metadata = SimpleNamespace(page_size=PAGE)
        self.stock_calls = 0

    def get_page_table_64(self):
        return self.page_table

    def get_seqlens_expanded(self):
        return self.seq_lens.int()

    def topk_transform(self, logits, topk):
        self.stock_calls += 1
        return torch.full((logits.shape[0], topk), -2, dtype=torch.int32)


def _settings(strides, calibration=False):
    from sglang_indexcache.sglang_overlay.settings import Settings

    return Settings(PATTERN, "--index-cache-pattern", calibration, None, None, strides,
                    None if strides is None else "--index-cache-decode-stride 4")


class World:
    """Requests over SGLang's real ReqToTokenPool, with paged KV slots, decoded step by step."""

    def __init__(self, fused: bool, seed: int):
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

        self.pool = ReqToTokenPool(size=POOL_ROWS, max_context_len=CONTEXT, device="cpu", enable_memory_saver=False)
        self.runner = SimpleNamespace(is_draft_worker=False, req_to_token_pool=self.pool,
                                      model_config=SimpleNamespace(hf_text_config=SimpleNamespace(index_topk=K)))
        self.fused, self.rng = fused, random.Random(seed)
        self.free_pages = list(range(1, 4000))
        self.rng.shuffle(self.free_pages)
        self.running, self.lengths, self.pages, self.life = [], {}, {}, {}
        self.indexer = Indexer()
        self.records = []          # per (step, request, layer): what was served and how
        self.kinds = []
        self.step_no = 0

    def _req(self, rid, prompt):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        return Req(rid=rid, origin_input_text="", origin_input_ids=[1] * prompt,
                   sampling_params=SamplingParams(max_new_tokens=1000))

    def _row(self, req):
        from sglang_indexcache.sglang_overlay import compat

        return compat.req_row(req)

    def _grow(self, req, length):
        """KV slots for positions up to ``length`` (page by page, random pages)."""
        pages = self.pages.setdefault(req.rid, [])
        while len(pages) * PAGE < length:
            pages.append(self.free_pages.pop())
        slots = torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in range(length)], dtype=torch.int32)
        self.pool.req_to_token[self._row(req), :length] = slots

    def _batch(self, reqs, mode):
        from sglang.srt.managers.schedule_batch import ScheduleBatch

        lengths = torch.tensor([self.lengths[r.rid] for r in reqs], dtype=torch.int64)
        return ScheduleBatch(reqs=list(reqs), forward_mode=mode, seq_lens_cpu=lengths), lengths

    def _forward_batch(self, reqs, mode, lengths):
        rows = torch.tensor([self._row(r) for r in reqs], dtype=torch.int64)
        return SimpleNamespace(forward_mode=mode, req_pool_indices=rows, seq_lens=lengths.clone())

    def join(self, rid, prompt=None, extend=True):
        """Allocate a row (generation bump) and prefill (an EXTEND forward) unless ``extend`` is False."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        from sglang_indexcache.sglang_overlay import decode_stride

        req = self._req(rid, prompt or self.lengths.get(rid, 20))
        assert self.pool.alloc([req]) is not None, "pool full"
        self.lengths.setdefault(rid, prompt or 20)
        self.pages.pop(rid, None)
        self._grow(req, self.lengths[rid])
        self.life[rid] = self.life.get(rid, -1) + 1
        if extend:
            batch, lengths = self._batch([req], ForwardMode.EXTEND)
            decode_stride.on_forward_batch(self._forward_batch([req], ForwardMode.EXTEND, lengths), batch, self.runner)
        self.running.append(req)
        return req

    def leave(self, rid):
        """Finish, abort or retraction: the row goes back to the pool (release_kv_cache's free)."""
        req = next(r for r in self.running if r.rid == rid)
        self.running.remove(req)
        self.pool.free(req)

    def decode(self):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        from sglang_indexcache.sglang_overlay import decode_stride

        reqs = list(self.running)
        for req in reqs:
            self.lengths[req.rid] += 1
            self._grow(req, self.lengths[req.rid])
        batch, lengths = self._batch(reqs, ForwardMode.DECODE)
        fb = self._forward_batch(reqs, ForwardMode.DECODE, lengths)
        decode_stride.on_forward_batch(fb, batch, self.runner)
        step = getattr(fb, decode_stride.STEP_ATTR, None)
        self.kinds.append(None if step is None else step.label)
        width = -(-int(lengths.max()) // PAGE)
        table = torch.zeros((len(reqs) + 1, width + 1), dtype=torch.int32)   # a wider table, as in graphs
        for b, req in enumerate(reqs):
            pages = self.pages[req.rid]
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        metadata = Metadata(table, lengths, self.fused)
        x = torch.zeros((len(reqs), 4))
        positions = lengths - 1
        for layer in F_LAYERS:
            logits = torch.randn((len(reqs), int(lengths.max()) + 3))        # the indexer's scores, padded
            served = decode_stride.reuse_topk(self.indexer, x, positions, fb, layer, None, metadata, True)
            how = "reuse"
            if served is None:
                served, how = decode_stride.topk_transform(self.indexer, metadata, logits, fb, layer), "refresh"
            for b, req in enumerate(reqs):
                self.records.append({
                    "step": self.step_no, "rid": req.rid, "life": self.life[req.rid], "layer": layer, "how": how,
                    "t": int(lengths[b]) - 1, "served": served[b].tolist(),
                    "logits": logits[b, :int(lengths[b])].tolist(),
                    "slots": self.pool.req_to_token[self._row(req), :int(lengths[b])].tolist()})
        self.step_no += 1


def life_cycle(fused: bool, release: str) -> dict:
    """Joins, finishes, aborts, retractions and row take-overs under stride 4 (k 8, page 4)."""
    from sglang_indexcache.sglang_overlay import decode_stride

    decode_stride.configure(_settings((STRIDE,) * len(PATTERN)))
    world = World(fused, seed=1 if fused else 2)
    events = []
    world.join("a", 30)
    world.join("b", 6)                     # shorter than k: its refreshes store fewer than k entries
    for _ in range(9):
        world.decode()
    world.join("c", 40)                    # joins mid-period: the whole batch refreshes
    for _ in range(6):
        world.decode()
    world.leave("b")                       # finishes
    events.append(["finish", "b", world.step_no])
    world.join("d", 25)                    # takes b's freed row (new generation)
    for _ in range(5):
        world.decode()
    world.leave("a")                       # retracted: its row freed ...
    events.append(["retract", "a", world.step_no])
    for _ in range(3):
        world.decode()
    world.join("a")                        # ... and back with its whole sequence recomputed (EXTEND)
    for _ in range(5):
        world.decode()
    world.leave("c")                       # aborted
    events.append(["abort", "c", world.step_no])
    world.join("e", 12, extend=False)      # a row taken over straight into decode: only the generation guards
    for _ in range(6):
        world.decode()
    if release == "0.5.17":                # clear() zeroes generations: a stale entry's may come back
        for rid in [r.rid for r in world.running]:
            world.leave(rid)
        world.pool.clear()
        world.join("f", 33)
        events.append(["clear", "f", world.step_no])
        for _ in range(6):
            world.decode()
    return {"records": world.records, "kinds": world.kinds, "events": events,
            "key_stores": world.indexer.stored, "store_bytes": decode_stride._STATE["store"].nbytes}


def stock_when_no_stride() -> dict:
    """Stride 1 (no stride flag): nothing allocated, every hook returns SGLang's own value."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_indexcache.sglang_overlay import decode_stride

    out = {}
    for name, settings in (("no-flags", None), ("pattern-only", _settings(None))):
        decode_stride.configure(settings)
        world = World(True, seed=3)
        req = world.join("a", 20)
        world.lengths["a"] += 1
        batch, lengths = world._batch([req], ForwardMode.DECODE)
        fb = world._forward_batch([req], ForwardMode.DECODE, lengths)
        decode_stride.on_forward_batch(fb, batch, world.runner)
        metadata = Metadata(torch.zeros((1, 8), dtype=torch.int32), lengths, True)
        logits = torch.randn(1, 21)
        stock = decode_stride.topk_transform(world.indexer, metadata, logits, fb, 0)
        out[name] = {
            "attr": hasattr(fb, decode_stride.STEP_ATTR),
            "reuse": decode_stride.reuse_topk(world.indexer, torch.zeros(1, 4), lengths - 1, fb, 0, None, metadata, True),
            "stock_calls": metadata.stock_calls, "stock_value": stock.tolist(),
            "store": decode_stride._STATE["store"], "mirror": decode_stride._STATE["mirror"],
            "capture_labels": list(decode_stride.capture_labels(world.runner)),
            "graph_variants": decode_stride.graph_variants(world.runner, None),
            "labels": [decode_stride.graph_label(label, fb) for label in (None, "lora", "nolora")]}
    return out


def graph_selection(release: str) -> dict:
    """The decode CUDA-graph runner's own capture loop (0.5.17) and label methods with the stride's
    variants; what the indexer hooks see while each kind is captured (no GPU: capture_one_shape and
    the memory probe are stand-ins)."""
    import contextlib

    from sglang.srt.model_executor.runner import decode_cuda_graph_runner as runner_mod
    from sglang.srt.model_executor.runner_utils import capture_mode
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_indexcache.sglang_overlay import decode_stride

    decode_stride.configure(_settings((STRIDE,) * len(PATTERN)))
    world = World(True, seed=4)
    runner = object.__new__(runner_mod.DecodeCudaGraphRunner)
    runner.model_runner = SimpleNamespace(device="cpu", gpu_id=0, model=None, tp_group=None, **vars(world.runner))
    out = {"captured": []}
    probe = SimpleNamespace(forward_mode=ForwardMode.DECODE)

    def seen_by_hooks():
        with capture_mode.model_capture_mode():
            step = decode_stride._step(probe)
        return None if step is None else step.label

    if release == "0.5.17":
        def capture_one_shape(bs, forward, stream_idx, label):
            out["captured"].append([bs, label, seen_by_hooks(), capture_mode.get_capture_lora_variant()])

        runner.capture_one_shape = capture_one_shape
        runner.capture_bs, runner.compile_bs, runner.captured_req_width = [1, 2], [], 1
        runner.record_nolora_graph = True
        runner_mod.get_available_gpu_memory = lambda *a, **k: 0.0
        runner_mod.get_parallel = lambda: SimpleNamespace(tp_rank=1)
        runner_mod.torch_compile_decoration = SimpleNamespace(
            patch_model=lambda *a, **k: contextlib.nullcontext(lambda *x, **y: None))
        runner._capture_one_stream()
        select = runner._resolve_lora_variant
    else:
        runner.attention_graph_variants = decode_stride.graph_variants(runner.model_runner, None)
        for label in runner.attention_graph_variants.capture_labels:   # what the runner's capture loop does
            capture_mode._set_capture_attention_variant(label)
            out["captured"].append([1, label, seen_by_hooks(), None])
        capture_mode._set_capture_attention_variant(None)

        def select(fb):
            return runner._resolve_attention_variant(fb, 8)
    out["after_capture"] = seen_by_hooks()
    reqs = [world.join("a", 20), world.join("b", 30)]
    replay = []
    for _ in range(6):
        for req in reqs:
            world.lengths[req.rid] += 1
        batch, lengths = world._batch(reqs, ForwardMode.DECODE)
        fb = world._forward_batch(reqs, ForwardMode.DECODE, lengths)
        fb.lora_ids = [None, None]
        decode_stride.on_forward_batch(fb, batch, world.runner)
        replay.append(select(fb))
    out["replay"] = replay
    no_step = SimpleNamespace(forward_mode=ForwardMode.DECODE, lora_ids=[None])
    out["replay_without_step"] = select(no_step)
    return out


def main(results_path: str, release: str) -> None:
    from sglang.test.test_utils import maybe_stub_sgl_kernel

    maybe_stub_sgl_kernel()
    results = {"fused": life_cycle(True, release), "positions": life_cycle(False, release),
               "stock": stock_when_no_stride(), "graphs": graph_selection(release)}
    with open(results_path, "w") as f:
        json.dump(results, f, default=repr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
