"""``indexcache bench serve`` (measure a running SGLang server) and ``bench serve-report`` (the table).

Registered as modes of ``indexcache bench`` (commands/bench.py); the logic is in
``sglang_indexcache.bench.serve`` / ``serve_run`` / ``serve_log`` / ``serve_report``. Stdlib only on
the measuring side: it runs on the GPU host with plain python3 and PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UsageError
from .options import int_list, positive_float, positive_int

MODES = ("serve", "serve-report")
SERVE_DESCRIPTION = (
    "Measure a running SGLang server: one warm-up request, then TTFT (batch 1, max_new_tokens 1) of"
    " --prefill-repeats requests per prompt length, then for each decode setup --decode-batch concurrent"
    " streamed requests of --decode-length tokens with --decode-tokens new tokens each (ignore_eos,"
    " temperature 0). Every request has its own random token ids (no two share a prefix). Decode tok/s"
    " comes from the inter-token times after each request's first token, inside the window where all"
    " requests decode, and, with --server-log, from SGLang's own 'Decode batch ... gen throughput' lines at"
    " the largest #running-req SGLang reached (it may run fewer than were sent; the JSON and the report"
    " say so), with the step time #running-req / tok/s. Failed requests are recorded and counted as lost;"
    " DIR/serve_<tag>.json is written after each phase.")
REPORT_DESCRIPTION = (
    "Merge serve_<tag>.json documents into Markdown: prompt-length rows x tag columns with TTFT and the"
    " speedup over --baseline; per decode setup the server log's tok/s and step time at the running count"
    " reached, the spread of its lines, the client's tok/s, with speedups; the per-indexer step cost and"
    " Amdahl bound where two patterns with different kept-indexer counts ran the same setup; host-bound"
    " warnings; and a runs table (date, device, radix cache, lost requests).")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def add_arguments(modes) -> None:
    p = modes.add_parser("serve", help="TTFT and decode throughput of a running SGLang server (JSON)",
                         description=SERVE_DESCRIPTION)
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the server (default %(default)s)")
    p.add_argument("--tag", required=True, help="name of this server setup in the report, e.g. stock-all-F,"
                   " every-4 (letters, digits, . _ + -); also salts the prompts' seeds")
    p.add_argument("--lengths", default="32k,64k,128k,200000",
                   help="prompt lengths for TTFT, '32k' = 32768 (default %(default)s)")
    p.add_argument("--prefill-repeats", default="2", help="requests per length: one count, or one per --lengths"
                   " entry, e.g. 2,2,1,1 (default 2; the report shows the min)")
    p.add_argument("--decode-batch", default="8", help="concurrent decode requests, one per decode setup, e.g. 8,32"
                   " (0: no decode run)")
    p.add_argument("--decode-length", default="200000", help="prompt tokens per decode request, one per decode"
                   " setup or one for all, e.g. 200000,32k (default %(default)s)")
    p.add_argument("--decode-tokens", type=positive_int, default=256,
                   help="new tokens per decode request (default 256)")
    p.add_argument("--pattern", metavar="P", help="the F/S pattern the server runs, recorded for the report's"
                   " Amdahl bound when the server does not say it (stock all-F; a patched server reports its own)")
    p.add_argument("--server-log", metavar="FILE", help="the server's log file: SGLang's own per-step 'gen"
                   " throughput' of the decode run is read from the lines it appends (serve the server with"
                   " --decode-log-interval 8)")
    p.add_argument("--warmup-length", default="2048", help="prompt tokens of the one warm-up request (default 2048)")
    p.add_argument("--vocab", type=int, default=4000, help="token ids are drawn from [1, VOCAB) (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="mixed into every request's seed with tag, length, index")
    p.add_argument("--timeout", type=positive_float, default=900.0, help="seconds per request, in all and without"
                   " data (default 900); a request over it is recorded as lost")
    p.add_argument("--api-key", default=os.environ.get("INDEXCACHE_API_KEY"),
                   help="Bearer key if the server needs one (default $INDEXCACHE_API_KEY)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/serve_<tag>.json (after each phase)")

    r = modes.add_parser("serve-report", help="merge `bench serve` JSON of several tags into a Markdown table",
                         description=REPORT_DESCRIPTION)
    r.add_argument("inputs", nargs="+", metavar="DIR|FILE", help="serve_<tag>.json files or folders holding them")
    r.add_argument("--baseline", required=True, metavar="TAG", help="the tag that speedups are relative to")
    r.add_argument("--stat", choices=("min", "median"), default="min", help="TTFT statistic (default min)")
    r.add_argument("--out", metavar="FILE", help="write the Markdown here (default: print it)")
    r.add_argument("--plot", metavar="PNG", help="write TTFT versus prompt length, one line per tag")


def _decodes(args) -> list[tuple[int, int]]:
    if args.decode_batch.strip() == "0":
        return []
    batches = int_list(args.decode_batch, "--decode-batch")
    lengths = int_list(args.decode_length, "--decode-length")
    if len(lengths) == 1:
        lengths *= len(batches)
    if len(batches) == 1:
        batches *= len(lengths)
    if len(batches) != len(lengths):
        raise UsageError(f"--decode-batch gives {len(batches)} setups but --decode-length {len(lengths)}")
    return list(zip(batches, lengths))


def _spec(args):
    from ..bench.serve_run import ServeSpec
    from ..errors import PatternError
    from ..pattern import parse, validate

    if not _TAG.match(args.tag):
        raise UsageError(f"--tag {args.tag!r}: use letters, digits and . _ + - (at most 64)")
    lengths = int_list(args.lengths, "--lengths")
    repeats = int_list(args.prefill_repeats, "--prefill-repeats")
    if len(repeats) not in (1, len(lengths)):
        raise UsageError(f"--prefill-repeats gives {len(repeats)} counts for {len(lengths)} --lengths")
    (warmup_length,) = _one_int(args.warmup_length, "--warmup-length")
    try:
        pattern = validate(args.pattern, len(parse(args.pattern))) if args.pattern else None
    except PatternError as exc:
        raise UsageError(f"--pattern: {exc}") from None
    spec = ServeSpec(tag=args.tag, lengths=lengths, prefill_repeats=repeats[0] if len(repeats) == 1 else repeats,
                     decodes=_decodes(args), decode_tokens=args.decode_tokens, warmup_length=warmup_length,
                     seed=args.seed, vocab=args.vocab, server_log=args.server_log, pattern=pattern)
    requests = spec.requests()
    if args.vocab <= requests + 1:
        raise UsageError(f"--vocab {args.vocab} is too small for {requests} prompts with distinct first tokens")
    if args.server_log and not Path(args.server_log).is_file():
        raise UsageError(f"--server-log {args.server_log}: no such file")
    return spec


def _one_int(text: str, flag: str) -> list[int]:
    values = int_list(text, flag)
    if len(values) != 1:
        raise UsageError(f"{flag} takes one length, got {text!r}")
    return values


def _client(args):
    from ..bench.serve import Client, ServeError

    try:
        client = Client(args.url, timeout_s=args.timeout, api_key=args.api_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        client.get_json("/health")
    except ServeError as exc:
        raise UsageError(f"the server at {args.url} is not answering /health: {exc}") from None
    return client


def _run_serve(args) -> int:
    import logging

    from ..bench import serve_run
    from ..atomic import atomic_write_text

    spec = _spec(args)
    client = _client(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc}") from None
    path = out / f"serve_{spec.tag}.json"
    doc = serve_run.run(spec, client, on_update=lambda d: atomic_write_text(path, json.dumps(d, indent=1) + "\n"))
    lost = doc["lost"]
    logging.getLogger(__name__).info("wrote %s: %d requests, %d lost, %d with cached prefix tokens", path,
                                     lost["requests"], lost["lost"], lost["cached_hits"])
    if lost["lost"]:
        logging.getLogger(__name__).warning("%d of %d requests were lost: %s", lost["lost"], lost["requests"],
                                            "; ".join(lost["errors"])[:300])
    return 0


def _run_report(args) -> int:
    from ..bench import serve_report

    docs = serve_report.load(args.inputs)
    text = serve_report.markdown(docs, args.baseline, args.stat)
    if args.plot:
        serve_report.plot(docs, args.plot, args.stat)
    if args.out:
        from ..atomic import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        print(text, end="")
    return 0


def run(args) -> int:
    return _run_serve(args) if args.mode == "serve" else _run_report(args)
