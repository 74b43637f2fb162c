"""The bench's rows: what each row trains (recipe, engine or Unsloth; data; memory budget; patches; timing), the
sets `--set` picks from (main, ablations, explore, free) and how `--rows` names pick and order them (pure). Every
row trains at LEARNING_RATE."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


LEARNING_RATE = 1e-4  # every row, recipe, engine and peer alike, so their losses can be compared step by step


@dataclass
class Row:
    name: str
    kind: str            # recipe | engine | unsloth
    data: str            # full | mix
    four_bit: bool = True
    packing: bool = False
    liger: bool = False
    budget_gb: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # engine: extra train/model settings
    recipe_ref: str | None = None   # the recipe row this row is compared with
    patch: dict[str, Any] = field(default_factory=dict)  # "module.attribute": value, set for this row only
    peer: dict[str, Any] = field(default_factory=dict)  # unsloth: checkpointing ("unsloth" | "none" | N layers
    # left un-checkpointed), model ("llama": the same weights with split q/k/v and gate/up, Unsloth's fast path)
    free: bool = False  # timed free-running (bench/timing.py): no wait for the GPU at each step, loss read late
    logged: bool = False  # free-running, but Trainer reads the loss every step (logging_steps 1, the app's default)


_FULL, _MIX = "recipe QLoRA full rows", "recipe QLoRA mix packed"
RECIPE = [
    Row(_FULL, "recipe", "full"),
    Row(_MIX, "recipe", "mix", packing=True),
]
BUDGETS = [(8, "8 GiB"), (24, "24 GiB"), (None, "whole GPU")]
# Unsloth has no memory budget: its rows are the checkpointing choice that fits each budget (all layers with
# inputs offloaded fits 8 GiB; 16 layers left un-checkpointed peaked at 20.3 GiB in issue 19's run).
UNSLOTH_AT = {8: {"checkpointing": "unsloth"}, 24: {"checkpointing": 16}, None: {"checkpointing": "none"}}
ENGINE = [Row(f"engine QLoRA {d}, {label}", "engine", d, budget_gb=b, recipe_ref=_FULL if d == "full" else _MIX)
          for b, label in BUDGETS for d in ("full", "mix")]
PEER = [Row(f"unsloth QLoRA {d}, {label}", "unsloth", d, budget_gb=b, peer={**UNSLOTH_AT[b], "model": "phi3"},
            recipe_ref=_FULL if d == "full" else _MIX)
        for b, label in BUDGETS for d in ("full", "mix")]
SIXTEEN = [Row(f"engine LoRA-16 full, {label}", "engine", "full", four_bit=False, budget_gb=b, recipe_ref=_FULL)
           for b, label in BUDGETS[1:]]
# What each technique gives: the engine with one choice turned back.
ABLATIONS = [
    Row("ablate: engine QLoRA full, all layers checkpointed, plain", "engine", "full", recipe_ref=_FULL,
        overrides={"train": {"gradient_checkpointing": True}}),
    Row("ablate: engine QLoRA full rows, 24 GiB, peft's LoRA forward (no lean_lora)", "engine", "full", budget_gb=24,
        overrides={"train": {"lean_lora": False}}, recipe_ref=_FULL),
    Row("ablate: engine QLoRA full, no Liger, whole GPU", "engine", "full", recipe_ref=_FULL,
        overrides={"train": {"use_liger_kernel": False}}),
    Row("ablate: engine QLoRA full, whole GPU, DropoutLoraA kept (no plain dropout)", "engine", "full",
        patch={"phi3_lora.families.PLAIN_DROPOUT_FACTOR": 1e9}, recipe_ref=_FULL),
    Row("recipe QLoRA full rows + Liger", "recipe", "full", liger=True),
    Row("recipe QLoRA mix padded", "recipe", "mix"),
]
_COMPILE = "phi3_lora.options.COMPILE_LAYERS"
_CUDNN, _DEQ = "phi3_lora.options.CUDNN_ATTENTION", "phi3_lora.options.DEQUANTIZE_FROZEN"
_ACT = "phi3_lora.options.COMPILED_ACTIVATION_BUDGET"
_DEFERRED = "phi3_lora.options.DEFERRED_METRICS"
_LAGGED = "phi3_lora.options.LAGGED_LOGS"
FREE_SUFFIX = ", free-running"
_WAITS = {"phi3_lora.options.NON_BLOCKING_INPUTS": False, "phi3_lora.options.SKIP_MASK_PROBE": False,
          "phi3_lora.options.HOST_LABEL_POSITIONS": False}
# Tried while tuning torch.compile, the memory budget's plans and the peer's set-up. The compiled
# rows come first: issue 19's lever, never run on a GPU yet (lean_lora traces without a graph break since
# 2026-12-02; compiled layers take only the loss from Liger unless COMPILED_LIGER is emptied).
EXPLORE = [
    # Packs of unequal lengths through cuDNN's fused attention with ragged offsets (speed/cudnn_ragged.py), not
    # flash's varlen kernel. Eighth session, whole GPU: 26,374 against 27,095 tok/s without it (slower; off).
    *(Row(f"explore: engine QLoRA mix, {label}, ragged cuDNN frontend", "engine", "mix", budget_gb=budget,
          patch={"phi3_lora.options.CUDNN_RAGGED": True}, recipe_ref=_MIX) for budget, label in BUDGETS),
    # The 8 GiB plan keeps 8% of each layer's activations (the memory model's share), yet a plan keeping 14%
    # peaked at the same 6.53 GiB (second session): the peak is set elsewhere, and 1.5 GiB of the budget is unused.
    # How much more the compiler can keep under 8 GiB, and what it gives (the goal is 19,500 tok/s; 1.6-1.8% short).
    # Ninth device session: 20% peaked at 12.6 GiB (full) / 9.6 (mix), 30% at 12.7, 40% at 14.1 (MFU 0.408-0.441
    # against 0.384-0.389 at the plan's 8%): the model does not overcount; 11-17% probe the largest share under 8.
    *(Row(f"explore: engine QLoRA {data}, 8 GiB, keeps {share:.0%}", "engine", data, budget_gb=8,
          patch={_ACT: share}, recipe_ref=ref)
      for share in (0.11, 0.14, 0.17, 0.2, 0.3, 0.4) for data, ref in (("full", _FULL), ("mix", _MIX))),
    # Inductor's autotuned Triton GEMMs, which can take the elementwise work before a product (the LoRA input's
    # dropout; with the other elementwise kernels 41 ms of a ~290 ms whole-GPU step, 39 in Unsloth's) into its kernel
    # (prologue fusion): the "fused dropout + LoRA" idea, at the compiler's level. Autotuning makes the
    # first steps far longer: run with a longer --row-timeout.
    *(Row(f"explore: engine QLoRA {data}, whole GPU, max-autotune GEMMs", "engine", data,
          patch={"phi3_lora.options.COMPILE_MODE": "max-autotune-no-cudagraphs"}, recipe_ref=ref)
      for data, ref in (("mix", _MIX), ("full", _FULL))),
    # The host waits the sixth session's profiles found, put back: blocking batch copies, transformers' probe of
    # packed rows and trl's labelled positions picked on the GPU (what removing them gives; --profile lists the
    # step's remaining waits by call site).
    Row("explore: engine QLoRA mix, whole GPU, host waits kept", "engine", "mix", patch=_WAITS, recipe_ref=_MIX),
    Row("explore: engine QLoRA full, whole GPU, host waits kept", "engine", "full", patch=_WAITS, recipe_ref=_FULL),
    # The step's host syncs (trl's metrics, Trainer's token count and NaN filter) kept, as before the deferral.
    Row("explore: engine QLoRA full, whole GPU, syncs kept", "engine", "full", patch={_DEFERRED: False},
        recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 8 GiB, syncs kept", "engine", "full", budget_gb=8, patch={_DEFERRED: False},
        recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled, cuDNN attention", "engine", "full",
        patch={_CUDNN: True, _DEQ: False}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled, 16-bit copies", "engine", "full",
        patch={_CUDNN: False, _DEQ: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled, cuDNN + 16-bit copies", "engine", "full",
        patch={_CUDNN: True, _DEQ: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA mix, whole GPU, compiled, cuDNN + 16-bit copies", "engine", "mix",
        patch={_CUDNN: True, _DEQ: True}, recipe_ref=_MIX),
    Row("explore: engine QLoRA full, whole GPU, compiled, neither", "engine", "full",
        patch={_CUDNN: False, _DEQ: False}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, copies, cuDNN (equal lengths)", "engine", "full",
        patch={_CUDNN: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, copies, cuDNN, CUDA graphs", "engine", "full",
        patch={_CUDNN: True, "phi3_lora.options.COMPILE_MODE": "reduce-overhead"}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 8 GiB, cuDNN (equal lengths)", "engine", "full", budget_gb=8,
        patch={_CUDNN: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 24 GiB, cuDNN (equal lengths)", "engine", "full", budget_gb=24,
        patch={_CUDNN: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA mix, whole GPU, no 16-bit copies", "engine", "mix", patch={_DEQ: False},
        recipe_ref=_MIX),
    Row("explore: engine QLoRA full, whole GPU, copies, CUDA graphs", "engine", "full",
        patch={_DEQ: True, "phi3_lora.options.COMPILE_MODE": "reduce-overhead"}, recipe_ref=_FULL),
    Row("explore: engine QLoRA mix, whole GPU, copies, CUDA graphs", "engine", "mix",
        patch={_DEQ: True, "phi3_lora.options.COMPILE_MODE": "reduce-overhead"}, recipe_ref=_MIX),
    Row("explore: engine QLoRA full, 8 GiB, keeps 14%, cuDNN", "engine", "full", budget_gb=8,
        patch={_CUDNN: True, _ACT: 0.14}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 24 GiB, keeps 72%, cuDNN", "engine", "full", budget_gb=24,
        patch={_CUDNN: True, _ACT: 0.72}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled layers", "engine", "full", patch={_COMPILE: True},
        recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, eager layers", "engine", "full", patch={_COMPILE: False},
        recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 24 GiB, eager layers", "engine", "full", budget_gb=24,
        patch={_COMPILE: False}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 8 GiB, eager layers", "engine", "full", budget_gb=8,
        patch={_COMPILE: False}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled, partitioner keeps 50%", "engine", "full",
        patch={_ACT: 0.5}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, compiled, partitioner keeps 62% (24 GiB plan)", "engine", "full",
        patch={_ACT: 0.62}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, compiled, partitioner keeps 10% (8 GiB plan)", "engine", "full",
        patch={_ACT: 0.10}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled, partitioner keeps 20%", "engine", "full",
        patch={_ACT: 0.2}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 8 GiB, compiled layers", "engine", "full", budget_gb=8, patch={_COMPILE: True},
        recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 8 GiB, compiled layers, all checkpointed", "engine", "full", budget_gb=8,
        patch={_COMPILE: True}, overrides={"train": {"gradient_checkpointing": True}}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 24 GiB, compiled layers", "engine", "full", budget_gb=24,
        patch={_COMPILE: True}, recipe_ref=_FULL),
    Row("explore: engine QLoRA mix, whole GPU, compiled layers", "engine", "mix", patch={_COMPILE: True},
        recipe_ref=_MIX),
    Row("explore: engine QLoRA full, whole GPU, compiled layers with Liger's kernels inside", "engine", "full",
        patch={_COMPILE: True, "phi3_lora.options.COMPILED_LIGER": {}}, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, whole GPU, compiled layers, no Liger, peft's LoRA forward", "engine", "full",
        patch={_COMPILE: True}, overrides={"train": {"use_liger_kernel": False, "lean_lora": False}},
        recipe_ref=_FULL),
    Row("explore: unsloth QLoRA full, whole GPU, Llama layout (its Llama fast path)", "unsloth", "full",
        peer={"checkpointing": "none", "model": "llama"}, recipe_ref=_FULL),
    Row("explore: unsloth QLoRA full, 8 GiB, Llama layout", "unsloth", "full",
        peer={"checkpointing": "unsloth", "model": "llama"}, recipe_ref=_FULL),
    Row("explore: unsloth QLoRA full, 24 GiB, Llama layout", "unsloth", "full",
        peer={"checkpointing": 16, "model": "llama"}, recipe_ref=_FULL),
    Row("explore: unsloth QLoRA full, 20 layers not checkpointed", "unsloth", "full",
        peer={"checkpointing": 20, "model": "phi3"}, recipe_ref=_FULL),
    # Free-running, but Trainer logs every step (logging_steps 1, the app's default): what the app's logging costs a
    # run, against the "free-running" rows (set "free"): each log read one log later (speed/lagged_logs.py, the
    # app's default on a GPU), and read at once (the stock Trainer: one wait for the GPU per step).
    *(Row(f"explore: engine QLoRA {data}, whole GPU, free-running, loss read every step", "engine", data, free=True,
          logged=True, recipe_ref=ref) for data, ref in (("mix", _MIX), ("full", _FULL))),
    *(Row(f"explore: engine QLoRA {data}, whole GPU, free-running, loss read every step at once", "engine", data,
          free=True, logged=True, patch={_LAGGED: False}, recipe_ref=ref)
      for data, ref in (("mix", _MIX), ("full", _FULL))),
    # Inductor's draw of LoRA dropout's mask fused into the layer-input kernels (one Philox call per element),
    # against the default: its own kernel, four values per Philox call (speed/dropout_mask.py); and with no LoRA
    # dropout at all, the most any cheaper draw can give (a different training: for scale only).
    *(Row(f"explore: engine QLoRA {data}, {label}, free-running, Inductor's dropout draw", "engine", data,
          budget_gb=budget, free=True, patch={"phi3_lora.options.DROPOUT_MASK_KERNEL": False},
          recipe_ref=ref + FREE_SUFFIX)
      for budget, label in BUDGETS for data, ref in (("full", _FULL), ("mix", _MIX))),
    *(Row(f"explore: engine QLoRA {data}, whole GPU, free-running, no LoRA dropout", "engine", data, free=True,
          overrides={"lora": {"lora_dropout": 0.0}}, recipe_ref=ref + FREE_SUFFIX)
      for data, ref in (("full", _FULL), ("mix", _MIX))),
    Row("explore: engine QLoRA full, 12 GiB", "engine", "full", budget_gb=12, recipe_ref=_FULL),
    Row("explore: engine QLoRA full, 16 GiB", "engine", "full", budget_gb=16, recipe_ref=_FULL),
]
# The main rows timed free-running (bench/timing.py): the host may run ahead of the GPU as in a training run that
# reads the loss every N steps, where the synchronised rows wait for the GPU at both ends of every step.
FREE = [dataclasses.replace(r, name=r.name + FREE_SUFFIX, free=True,
                            recipe_ref=r.recipe_ref and r.recipe_ref + FREE_SUFFIX)
        for r in RECIPE + ENGINE + PEER + SIXTEEN]
SETS = {"main": RECIPE + ENGINE + PEER + SIXTEEN, "ablations": ABLATIONS, "explore": EXPLORE, "free": FREE}


def all_rows() -> list[Row]:
    return [r for rows in SETS.values() for r in rows]


def named(row: Row, name: str) -> bool:
    """"=NAME" is that row only; anything else, every row whose name contains it (any case)."""
    return row.name == name[1:] if name.startswith("=") else name.lower() in row.name.lower()


def ordered_rows(names: list[str] | None, which: str | list[str] = "main") -> list[Row]:
    """Rows of the chosen sets ("all" = main + ablations), each once, optionally only those named."""
    sets = [which] if isinstance(which, str) else list(which)
    if "all" in sets:
        sets = ["main", "ablations"] + [s for s in sets if s not in ("all", "main", "ablations")]
    rows: list[Row] = []
    for s in sets:
        rows += [r for r in SETS[s] if r not in rows]
    if names and all(n.startswith("=") for n in names):  # exact names: in the order given
        return [r for n in names for r in rows if named(r, n)]
    if names:
        rows = [r for r in rows if any(named(r, n) for n in names)]
    return rows


def run_order(rows: list[Row], repeat: int) -> list[Row]:
    """Repeat 0 in the listed order, repeat 1 reversed, and so on: with every row in its own process the order
    must not matter, and alternating it shows whether it does."""
    return list(rows) if repeat % 2 == 0 else list(reversed(rows))
