"""The GPU host: the offline bundle installed, our package laid out, a patched SGLang copy, checkpoints.

Everything lives under /tmp, which the host keeps between calls while it stays warm:
``/tmp/ic-site`` (the bundle of ``indexcache gpu-bundle``, carried in ``.gpu/bundle/``),
``/tmp/ic-ours`` (this checkout laid out as the installed package: pyproject maps ``kernels/`` and
``calibration/`` into it), ``/tmp/ic-patched`` (SGLang copied from the bundle, the patch series
applied), ``/tmp/ic-ck/NAME`` (checkpoints of ``indexcache make-checkpoint``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE, OURS, PATCHED, CK = Path("/tmp/ic-site"), Path("/tmp/ic-ours"), Path("/tmp/ic-patched"), Path("/tmp/ic-ck")
CALIBRATED_L32 = Path("/tmp/ic-work/calibrated-l32.json")  # where a calibration phase on the host leaves its file
DEVICE = "cuda"  # where make-checkpoint draws random weights
PORT = 30000
URL = f"http://127.0.0.1:{PORT}"
ADMIN_KEY = "live-admin-key"
# SGLang 0.5.17 on sm_90 without FA3 (docs/gpu.md): FlashMLA sparse for both phases with bf16 KV
COMMON_ARGS = ["--dtype", "bfloat16", "--sampling-backend", "pytorch", "--host", "127.0.0.1", "--port", str(PORT)]
BF16_KV = ["--kv-cache-dtype", "bfloat16", "--dsa-prefill-backend", "flashmla_sparse",
           "--dsa-decode-backend", "flashmla_sparse"]
# fp8 KV on Hopper: SGLang's own default backends for it (arg_groups/overrides.py, 0.5.17)
FP8_KV = ["--kv-cache-dtype", "fp8_e4m3", "--dsa-prefill-backend", "flashmla_kv", "--dsa-decode-backend", "flashmla_kv"]

# name -> make-checkpoint arguments; random weights from one seed, so flavours of one shape share weights
CHECKPOINTS = {
    "plain": ["--hidden", "2048", "--layers", "8", "--flavour", "plain"],
    "own": ["--hidden", "2048", "--layers", "8", "--flavour", "own-pattern", "--pattern", "FSFSFSFS"],
    "glm52": ["--hidden", "2048", "--layers", "8", "--flavour", "glm52", "--pattern", "FSSSFSSS"],
    "glm5": ["--hidden", "6144", "--layers", "4", "--flavour", "plain"],
    "l32": ["--hidden", "2048", "--layers", "32", "--flavour", "plain"],
    "l78-config": ["--hidden", "2048", "--layers", "78", "--flavour", "plain", "--weights", "none"],
    "l16": ["--hidden", "2048", "--layers", "16", "--flavour", "plain"],
    # what `calibrate --url` needs of a --load-format dummy checkpoint: the indexer tensors (1.4 GB)
    "l78-indexers": ["--hidden", "2048", "--layers", "78", "--flavour", "plain", "--weights", "indexer"],
}


def layers(checkpoint: str) -> int:
    args = CHECKPOINTS[checkpoint]
    return int(args[args.index("--layers") + 1])


def hidden(checkpoint: str) -> int:
    args = CHECKPOINTS[checkpoint]
    return int(args[args.index("--hidden") + 1])


def env(tree: str) -> dict:
    """Environment of a host process: stock (the bundle) or patched SGLang (its copy, then our package)."""
    path = [str(PATCHED), str(OURS), str(SITE)] if tree == "patched" else [str(SITE), str(OURS)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", SGLANG_DSA_PREFILL_DENSE_ATTN_KV_LEN_THRESHOLD="0",
                TOKENIZERS_PARALLELISM="false")


def run(cmd, tree: str = "patched", timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the checkout's own
    # sglang_indexcache/ lacks the kernels/ and calibration/ that the laid-out package maps in
    return subprocess.run([str(c) for c in cmd], env=env(tree), capture_output=True, text=True, timeout=timeout,
                          cwd=str(OURS), **kw)


def indexcache(*args, tree: str = "patched", timeout: float = 900) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sglang_indexcache", *args], tree=tree, timeout=timeout)


def launcher(spec, args: list) -> tuple[list, dict, str]:
    """The command line of a server spec (servers.ServerManager's launcher)."""
    model = CK / spec.checkpoint
    if spec.via_serve:  # indexcache serve --model M --pattern-file F -- ARGS
        argv = [sys.executable, "-m", "sglang_indexcache", "serve", "--model", model, "--pattern-file",
                spec.via_serve, "--", *COMMON_ARGS, *args]
    else:
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, *COMMON_ARGS, *args]
    return [str(a) for a in argv], env(spec.tree), str(OURS)


# ------------------------------------------------------------------ set-up steps

def install_bundle(ctx) -> float | None:
    if (SITE / ".installed").is_file():
        return None
    t = time.time()
    bundle = REPO / ".gpu" / "bundle"
    proc = subprocess.run([sys.executable, str(bundle / "install.py"), "--target", str(SITE)],
                          capture_output=True, text=True, timeout=600)
    (ctx.work / "install.log").write_text(proc.stdout + proc.stderr)
    if not ctx.check("bundle installs (checksums, pip --no-index)", proc.returncode == 0, proc.stderr[-2000:]):
        raise RuntimeError("the bundle did not install: see install.log")
    (SITE / ".installed").write_text("ok")
    return round(time.time() - t, 1)


def lay_out_package() -> None:
    """This checkout as the installed package (pyproject maps kernels/, calibration/ and, under data/,
    patches/, models/ and requirements/ into it)."""
    package = OURS / "sglang_indexcache"
    if (package / "data").is_dir():
        return
    package.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "sglang_indexcache").iterdir():
        if not (package / entry.name).is_symlink():
            (package / entry.name).symlink_to(entry)
    for name in ("kernels", "calibration"):
        if not (package / name).is_symlink():
            (package / name).symlink_to(REPO / name)
    (package / "data").mkdir()
    for name in ("patches", "models", "requirements"):
        (package / "data" / name).symlink_to(REPO / name)


def patch_sglang(ctx) -> float | None:
    if (PATCHED / ".patched").is_file():
        return None
    t = time.time()
    shutil.rmtree(PATCHED, ignore_errors=True)
    PATCHED.mkdir(parents=True)
    shutil.copytree(SITE / "sglang", PATCHED / "sglang")
    applied = run([sys.executable, "-m", "sglang_indexcache.sglang_overlay.patchset", "apply", PATCHED])
    again = run([sys.executable, "-m", "sglang_indexcache.sglang_overlay.patchset", "apply", PATCHED])
    ctx.check("patch series applies to the bundle's SGLang 0.5.17", applied.returncode == 0,
              applied.stdout + applied.stderr)
    ctx.check("second apply says already applied", "already applied" in again.stdout, again.stdout + again.stderr)
    if applied.returncode != 0:
        raise RuntimeError("the patch series did not apply")
    (PATCHED / ".patched").write_text(applied.stdout)
    return round(time.time() - t, 1)


def checkpoint(ctx, name: str) -> dict | None:
    """Write checkpoint ``name`` (random bf16 weights drawn on the GPU) unless it is there; its timing."""
    path = CK / name
    if (path / "config.json").is_file():
        return None
    args = CHECKPOINTS[name]
    weights = [] if "--weights" in args else ["--weights", "random"]
    t = time.time()
    proc = indexcache("make-checkpoint", path, *args, *weights, "--device", DEVICE)
    seconds = round(time.time() - t, 1)
    (ctx.work / f"make_checkpoint_{name}.log").write_text(proc.stdout + proc.stderr)
    ctx.check(f"checkpoint {name} written ({' '.join(args)})", proc.returncode == 0, proc.stderr[-1500:])
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint {name} was not written")
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    ctx.log(f"checkpoint {name}: {size / 1e9:.2f} GB in {seconds:.0f} s")
    return {"seconds": seconds, "bytes": size}


def setup_phase(checkpoints):
    """The set-up phase writing ``checkpoints`` (a list of CHECKPOINTS names, or a callable of the state)."""
    def setup(ctx) -> dict:
        out = {"install_s": install_bundle(ctx)}
        lay_out_package()
        out["patch_s"] = patch_sglang(ctx)
        smoke = run([sys.executable, "-c", "import sglang, sgl_kernel, deep_gemm, flashinfer, transformers;"
                     " print(sglang.__version__, transformers.__version__)"])
        ctx.check("SGLang stack imports on the host", smoke.returncode == 0, smoke.stdout + smoke.stderr[-1500:])
        out["versions"] = smoke.stdout.strip()
        names = checkpoints(ctx.state) if callable(checkpoints) else checkpoints
        out["checkpoints"] = {name: checkpoint(ctx, name) for name in names}
        written = {k: v for k, v in out["checkpoints"].items() if v}
        out["headline"] = ", ".join(f"{k} {v['bytes'] / 1e9:.1f} GB in {v['seconds']:.0f} s"
                                    for k, v in written.items()) or "all in place"
        return out
    return setup
