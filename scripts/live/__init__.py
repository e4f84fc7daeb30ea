"""The live GPU runner: a resumable, deadline-aware queue of measurement phases on one GPU host.

``scripts/gpu_live.py`` is the entry point; this package is its library (stdlib only, plus stdlib-only
modules of ``sglang_indexcache``: the ``bench.serve*`` client, ``pattern``, ``shared_layers``' pool
arithmetic; no torch, numpy or SGLang in the runner's process):

- ``runner``: phases, the state kept in /tmp between calls, the queue with its deadline, packing;
- ``servers``: SGLang servers started in their own process session (they outlive a call);
- ``host``: the host set-up (offline bundle, our package laid out, patched SGLang copy, checkpoints);
- ``measure``: the bench-serve parts, memory, saturation and chunked-prefill phases of issue 21
  (``capacity``: KV tokens and saturation, on ``memory``'s pool predictions; ``chunked``: the
  chunked-prefill comparison);
- ``checks``: the launcher and calibration-server checks;
- ``calsearch``: calibration through the server (issue 23): timing at depth, plain against in-flight;
- ``plans``: named queues of phases (``--plan``), and how another helper's phase plugs in;
- ``report``: the summary JSON as Markdown tables (docs/perf.md).
"""
