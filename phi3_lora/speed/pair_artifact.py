"""Compare's compiled pair step as an AOTInductor package on disk: compiled in a child process, loaded by the app.

Compiling the step inside the app (torch.compile in a background thread) held the GIL for minutes: the app's eager
Compare answers were ~13x slower meanwhile, and every process start compiled again (docs/benchmarks.md, CPU,
twelfth session). Here the step module (`pair_step.step_module`) is `torch.export`ed with the buffers' length as a
dynamic dim and compiled by `aoti_compile_and_package` in a child process at nice 19 (`python -m
phi3_lora.speed.pair_compiler`), under the same compiler settings (`pair_step.compiler_settings`: frozen weights,
oneDNN packed products, ATen's order); the app only loads the package (`load`: a second or two).

One package per base weights (their content), LoRA structure (targets, ranks, scaling: the LoRA tensors are the
step's runtime inputs, so it serves every adapter of that structure), thread count (inductor bakes it into its
OpenMP loops), dtype, torch version, CPU and this code (`key`). They live in the phi3_lora cache folder
(`embedded.cache_dir()`/pair_steps/<key>/), which only this user writes: a package is written into a temporary
folder and renamed into place when complete, carries its own SHA-256 (`meta.json`), and is loaded only from a
folder this user owns that nobody else can write; anything else there (a partial or corrupt package) is removed
and compiled again. The attention op (`pair_ops`, Python) is defined before a load: the package calls it through
the dispatcher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a package holds changes
PACKAGE, META, LOG = "step.pt2", "meta.json", "compile.log"
CAPACITY_MAX = 1 << 16  # the longest buffers (prompt + answer + 1) the package's dynamic dim accepts
CHILD_TIMEOUT_S = 3 * 3600
KEEP = 3  # packages kept (~660 MB each for the embedded model): the most recently used; each rank/targets/model is one
PARENT_ENV = "PHI3_LORA_PAIR_COMPILER_PARENT"  # the app's pid, given to its compiler process (it ends with the app)
_CODE = ("pair_step.py", "pair_ops.py", "aten_order.py", "pair_artifact.py", "pair_compiler.py")


def folder() -> Path:
    from phi3_lora.embedded import cache_dir

    return cache_dir() / "pair_steps"


def _tensor_digest(h: Any, t: Any) -> None:
    import torch

    t = t.detach().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).reshape(-1).numpy())  # hashlib lets go of the GIL for buffers this size


def key(w: Any, threads: int) -> str:
    """The package's name: what the compiled step depends on (see the module docstring), never the LoRA values."""
    import torch
    import transformers

    from phi3_lora.speed import aten_order, pair_step

    h = hashlib.sha256(f"format {FORMAT}".encode())
    for t in (w.embed, w.head, w.final_norm, *(t for parts in w.layers for t in parts.values())):
        _tensor_digest(h, t)
    shape = {k: getattr(w, k) for k in ("eps", "groups", "scaling", "heads", "kv_heads", "head_dim", "hidden",
                                        "intermediate")}
    lora = [[list(k), list(p.a_t.shape), str(p.a_t.dtype), list(p.b_t.shape), str(p.b_t.dtype),
             list(p.cols) if p.cols is not None else None, p.scaling, p.folded] for k, p in w.lora.items()]
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    here = Path(__file__).parent
    code = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE]
    env = [torch.__version__, transformers.__version__, torch.backends.cpu.get_cpu_capability(), flags,
           aten_order.lanes(), threads, pair_step.FUSE_SIBLINGS, pair_step.FUSED_NORMS, CAPACITY_MAX]
    h.update(json.dumps([shape, lora, env, code], default=str).encode())
    return h.hexdigest()[:32]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _ours(path: Path) -> bool:
    """A folder or file this user owns and nobody else may write."""
    st = path.lstat()
    return not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def find(k: str) -> Path | None:
    """The complete package for key `k`, or None; a package there that is not complete and ours is removed."""
    base, where = folder(), folder() / k
    if not where.exists():
        return None
    try:
        meta = json.loads((where / META).read_text())
        package = where / PACKAGE
        if _ours(base) and _ours(where) and _ours(package) and meta.get("key") == k \
                and package.stat().st_size == meta.get("size") and sha256(package) == meta.get("sha256"):
            os.utime(where / META)  # last used: prune keeps the most recently used packages
            return package
        why = "not ours, or its checksum differs"
    except (OSError, ValueError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    log.warning("Compare's compiled pair step: the package in %s is incomplete or damaged (%s); compiling again",
                where, why)
    remove(where)
    return None


def prune(base: Path, keep: int) -> list[str]:
    """Remove all but the `keep` most recently used packages in `base` (by their meta.json's time: written when
    compiled, touched at each load); the names removed. A process that loaded a removed package keeps running it
    (the loader unpacks it elsewhere first); a later start compiles it again."""
    def used(p: Path) -> float:
        try:
            return (p / META).stat().st_mtime
        except OSError:
            return 0.0

    packages = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")), key=used,
                      reverse=True)
    for old in packages[keep:]:
        remove(old)
    return [p.name for p in packages[keep:]]


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def load(package: Path) -> Any:
    """The loaded package: called with the step module's inputs, it gives the pair's logits."""
    import torch

    from phi3_lora.speed import pair_ops

    pair_ops.define()  # the package calls the attention op through the dispatcher
    from torch._inductor.package.package import AOTICompiledModel

    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1))


def compile_in_child(spec: dict[str, Any], k: str, timeout: float = CHILD_TIMEOUT_S) -> Path:
    """Compile the package for key `k` in a child process at nice 19 (it lowers itself first; started from a nice
    thread it inherits that too) (`spec`: how to load the engine: model name,
    settings, adapter folder, thread count) and return its path. Raises RuntimeError with the child's last words."""
    base = folder()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _ours(base):
        raise RuntimeError(f"{base} is not this user's own folder: not loading compiled code from it")
    for stale in base.glob(".partial-*"):  # a compile that died (a killed app): older than a day, gone
        try:
            if time.time() - stale.stat().st_mtime > 86400:
                remove(stale)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=base))
    try:
        with open(tmp / LOG, "w") as out:
            done = subprocess.run([sys.executable, "-m", "phi3_lora.speed.pair_compiler", json.dumps(spec), k,
                                   str(tmp)], stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": _pythonpath(),
                                       PARENT_ENV: str(os.getpid())})
        if done.returncode != 0:
            tail = (tmp / LOG).read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"its compiler process ended with code {done.returncode}: {' | '.join(tail)}")
        final = base / k
        try:
            os.rename(tmp, final)
        except OSError:  # another process put it there first
            if find(k) is None:
                raise
        prune(base, KEEP)
        return final / PACKAGE
    finally:
        remove(tmp)


def _pythonpath() -> str:
    """phi3_lora's own folder first, so that the child runs this code (a worktree, a test run)."""
    here = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
