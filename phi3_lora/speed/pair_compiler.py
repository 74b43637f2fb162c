"""The compiler process of Compare's pair step (`python -m phi3_lora.speed.pair_compiler SPEC KEY OUT`, started by
`pair_artifact.compile_in_child`): loads the engine's model and adapter as the app has them, checks that they give
the key the app asked for, exports the step and compiles it with AOTInductor into OUT (the package and its
meta.json), at nice 19."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def build(spec: dict[str, Any], k: str, out: Path) -> None:
    """The child's work: load the engine as the app has it, check the key, export the step and compile it into
    `out` with its meta.json (the package's checksum)."""
    import dataclasses

    import torch
    from torch.export import Dim

    from phi3_lora import families, merging
    from phi3_lora.config import ModelSettings
    from phi3_lora.generate import ChatEngine
    from phi3_lora.speed import aten_order, pair_artifact, pair_graph, pair_step

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    fields = {f.name for f in dataclasses.fields(ModelSettings)}
    settings = ModelSettings(**{n: v for n, v in spec["settings"].items() if n in fields})
    engine = ChatEngine(spec["model"], spec["adapter"], model_settings=settings)
    model = engine.model
    routing = merging.RowRouting(merging.plain_lora_layers(model), families.sibling_layers(model))
    routing.first_tuned = 1
    w = pair_step.weights(model, routing)
    if pair_artifact.key(w, threads) != k:
        raise SystemExit("the model or adapter on disk is not the one the app has loaded (key differs)")
    started = time.perf_counter()
    with torch.no_grad(), pair_step.compiler_settings():
        if pair_step.FUSED_NORMS and w.embed.dtype == torch.float32:
            w.width = aten_order.faithful(pair_graph.ROWS, w.hidden, w.intermediate, w.eps)
        module = pair_step.step_module(w)
        state = pair_graph.PairState.empty(w, capacity=37)  # an odd size: not tied to a model dim
        capacity = Dim("capacity", min=4, max=pair_artifact.CAPACITY_MAX)
        layers = len(w.layers)
        dims = (None, None, None, [{2: capacity}] * layers, [{2: capacity}] * layers, {1: capacity}, None,
                [None] * len(module.lora_inputs))
        program = torch.export.export(module, state.example_inputs() + (module.lora_inputs,), dynamic_shapes=dims,
                                      strict=False)
        exported = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(out / pair_artifact.PACKAGE),
                                                           inductor_configs={"freezing": True})
    meta = {"key": k, "size": os.path.getsize(package), "sha256": pair_artifact.sha256(Path(package)),
            "width": w.width, "threads": threads, "export_s": exported - started, "compile_s": time.perf_counter() - exported}
    (out / pair_artifact.META).write_text(json.dumps(meta))
    print(json.dumps(meta), flush=True)


def _die_with_the_app() -> None:
    """End this process when the app that started it ends (Linux: PR_SET_PDEATHSIG), instead of compiling on as an
    orphan whose package nobody would put in place (the app renames it)."""
    from phi3_lora.speed import pair_artifact

    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(os.environ.get(pair_artifact.PARENT_ENV, os.getppid())):  # the app ended before prctl
        raise SystemExit(1)


if __name__ == "__main__":
    _die_with_the_app()
    os.umask(0o077)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):
        pass
    build(json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
