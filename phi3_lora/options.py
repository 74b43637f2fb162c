"""The `auto` knobs of a run decided for this machine, and the SFTConfig they become (pure).

Kept apart from train.py so the decisions (packing, attention path, Liger, how many layers to
checkpoint for the memory budget, optimizer, dtype flags) can be read and tested without a model.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3_lora import families
from phi3_lora.config import RunConfig
from phi3_lora.estimate import LayerKeeps, MemoryEstimate, estimate_memory, model_shape
from phi3_lora.trackers import PROJECT, report_to_arg


@dataclass
class ResolvedOptions:
    """`auto` fields of TrainSettings decided for this machine (pure; see `resolve_options`)."""

    device: str
    gradient_checkpointing: bool
    packing: bool
    use_liger_kernel: bool
    optim: str
    bf16: bool
    fp16: bool
    attn_implementation: str = "sdpa"
    checkpointed_layers: int | None = None  # with gradient_checkpointing: how many decoder layers; None = all
    fp32_upcast: bool = True  # peft's prepare_model_for_kbit_training (fp32 norms/embeddings) for 4-bit bases
    lean_lora: bool = True  # lean_lora.install: the LoRA update as one addmm
    # lean_lora's DropoutLoraA (mask regenerated in backward, less memory) or LoRA dropout kept the plain way
    # (faster where memory is not short: the budget fits every layer un-checkpointed even so).
    save_dropout_memory: bool = True
    compile_layers: bool = False  # torch.compile on each decoder layer (COMPILE_LAYERS)
    # Compiled layers under a memory budget: the share of their activations the compiler keeps (torch's
    # activation_memory_budget; it recomputes the cheapest ops first). None: all it wants.
    activation_budget: float | None = None
    # The loss head scores only the labelled positions (speed/compact_loss.py): trl does so on CUDA by itself;
    # on the CPU it scored every position (quick-cpu batches: 3 steps 9.0 s -> 5.1 s, same loss).
    compact_loss: bool = False
    # SDPA takes cuDNN's fused attention first (speed/sdpa_backend.py; CUDNN_ATTENTION).
    cudnn_attention: bool = False
    # How many decoder layers keep a 16-bit copy of their frozen 4-bit weights (speed/dequantized.py): the room a
    # budget has left once every activation is kept.
    dequantized_layers: int = 0
    # trl's step metrics and the token counts stay on the device until a log reads them (speed/deferred_metrics.py;
    # DEFERRED_METRICS), and a NaN loss is logged as NaN instead of being filtered (the filter reads the loss).
    deferred_metrics: bool = False
    # Each log's numbers read one log later, when the GPU has finished them (speed/lagged_logs.py; LAGGED_LOGS):
    # a log no longer waits for the GPU to drain its queue. CUDA only: on the CPU there is no queue to wait for.
    lagged_logs: bool = False
    # The loss head's labelled positions found on the host by the collator (speed/label_positions.py;
    # HOST_LABEL_POSITIONS): trl picks them on the GPU with boolean indexing, two waits for the GPU per step.
    host_label_positions: bool = False


# The share of the budget that the estimate may fill: the rest is the allocator's slack and the CUDA context.
BUDGET_SHARE = 0.95
# torch.compile on each decoder layer (CUDA). H200, 2026-12-02 (docs/benchmarks.md, issue 19): full rows on the
# whole GPU 20,847 -> 22,628 tok/s, every layer checkpointed 15,823 (8 GiB). Compiled layers keep lean_lora's one
# addmm and take from Liger only its loss (COMPILED_LIGER): the compiler fuses RMSNorm, RoPE and SwiGLU itself.
# DropoutLoraA steps aside under the compiler, so an un-checkpointed compiled layer keeps LoRA dropout's masks
# (measured: the same peak as plain dropout, 32.6 GiB whole GPU; letting the partitioner recompute them from philox
# seeds saved nothing: 23,032 tok/s at 32.62 GiB).
COMPILE_LAYERS = True
# The share of a compiled layer's activations the partitioner may keep (torch._functorch.config.
# activation_memory_budget: below 1 it recomputes the cheapest ops first); None leaves torch's default (1.0).
COMPILED_ACTIVATION_BUDGET: float | None = None
# The smallest share a budget plan uses. Measured on the H200 (full rows): a share of 0.10 ran 17,256 tok/s at
# 6.53 GiB (its estimate 7.63), where 29 checkpointed compiled layers gave 16,746 at 7.03; the 8 GiB plan keeps
# 0.09 (not measured). Below this share every layer is checkpointed (15,823 tok/s at 5.1 GiB).
MIN_ACTIVATION_SHARE = 0.05
# Compare's pair (base + tuned row) decoded on a CPU by a compiled step, compiled while no training runs in a child
# process at nice 19 as an AOTInductor package that the app loads, cached per base weights and LoRA structure
# (phi3_lora/speed/pair_graph.py, pair_artifact.py: Llama-shaped models, the eager step's logits bit for bit). On by
# default since 2026-12-05 (docs/benchmarks.md, CPU, "whole answers"; embedded model, 2-core EPYC, 128-token greedy
# answers, 5 prompts x 3, under an exclusive lock): the package serves the longer answer to its end, 25.4 tokens/s
# per side against eager's 18.3 (medians; 1.36x in wall time), the same answers; through the app's streaming 21.5
# against 18.0 (1.19x). A first start compiles for ~6 minutes of nice-19 CPU while the app answers (its answers
# meanwhile 15.2 against 16.6 tokens/s, medians) and needs memory for it (the compiler peaked at 3.9 GB, 7.2x the
# weights: `background.memory_short` waits below 8x); the app holds ~1.2 GB more once the package is loaded; a
# restart loads it in ~4 s. Only the app's Compare
# engines in float32 compile by default (pair_graph.asked); the test suite keeps it off (tests/conftest.py sets
# PHI3_LORA_COMPILED_PAIR=0). Env PHI3_LORA_COMPILED_PAIR=1 / 0: on for every engine / off, for a process.
COMPILED_PAIR_CPU = True
# torch.compile's mode for the decoder layers (None: the default; "reduce-overhead": CUDA graphs). Bench only.
COMPILE_MODE: str | None = None
# SDPA's kernel order with cuDNN's fused attention first on Hopper GPUs (speed/sdpa_backend.py), and full-length
# packed rows through one batched SDPA call (speed/packed_attention.py; other packs keep the varlen kernel). H200,
# 2026-12-02, full rows, one session (docs/benchmarks.md): whole GPU 23,047 -> 25,022 tok/s (39.4 -> 42.4 GiB),
# 8 GiB 17,251 -> 18,399 (6.53 GiB both), 24 GiB 21,979 -> 22,682 (18.7 -> 21.7 GiB; estimate.DENSE_ATTENTION_HIDDEN).
CUDNN_ATTENTION = True
# 16-bit copies of the frozen 4-bit weights where the budget has room after every activation (speed/dequantized.py).
# H200, 2026-12-02 (docs/benchmarks.md): whole GPU, compiled layers, full rows 23,080 -> 23,405 / 23,454 tok/s at
# 32.6 -> 39.4 GiB (no dequantisation kernels left in the step's profile).
DEQUANTIZE_FROZEN = True
# trl's entropy / token accuracy / token counts and Trainer's tokens seen read at each log, not in every step
# (speed/deferred_metrics.py, issue 19): H200, a step showed 14 cudaStreamSynchronize, 302 ms of kernels in 354 ms.
DEFERRED_METRICS = True
# The app logs every step (the live curve): each log read the loss, grad norm and metrics at once, one wait for the
# GPU per step. Read one log later instead (speed/lagged_logs.py); the numbers and steps logged are the same.
# H200, 2026-12-05 (docs/benchmarks.md, eleventh device session), whole-GPU chat mix, same packs: the read at once
# cost a step 6% against a run that logs only at its end; lagged, 0.998x of it (1.050x the read at once).
LAGGED_LOGS = True
# Batches copied to the GPU without the host waiting for each copy (accelerate's `non_blocking`, from the pinned
# memory the data loader fills on CUDA): a blocking copy of each batch tensor (input ids, labels, position ids,
# sequence boundaries) waits for the GPU to finish the work queued before it, and the GPU then waits for the next
# batch's collation. Between steps (outside bench/timing.py's timed window, inside a real run's wall time); not yet
# measured on its own (issue 19's sixth session, docs/benchmarks.md).
NON_BLOCKING_INPUTS = True
# trl's fused loss head scores the labelled positions the collator found on the host, not ones it finds with
# boolean indexing on the GPU (each a `nonzero` the host waits for: two per step). Issue 19's sixth session; not yet
# measured on its own (the explore rows "host waits kept" put it back).
HOST_LABEL_POSITIONS = True
# The packed attention's forward skips transformers' host probe of padding-free rows (a `.all()` on a GPU tensor
# before every forward; speed/packed_attention.py `_skip_packed_mask_probe`). Same session, same A/B rows.
SKIP_MASK_PROBE = True
# Packs of unequal lengths through cuDNN's fused attention with ragged offsets (speed/cudnn_ragged.py, cuDNN's own
# Python frontend) instead of flash's varlen kernel, where the frontend is installed. Off: measured on an H200
# (issue 19's eighth session) it is right but slower, 1.75-1.84 ms a layer against flash's 1.26-1.55 on the chat
# mix, 26,374 against 27,095 tok/s in training; kept for GPUs and cuDNN versions where that may turn.
CUDNN_RAGGED = False
# LoRA dropout's mask in compiled layers on CUDA drawn by one Triton kernel, four values per Philox call
# (speed/dropout_mask.py), not Inductor's one call per element fused into the kernel that makes the layer input.
# On: measured on an H200 (issue 19, fourteenth session, against the stock row on the same machine): 8 GiB
# 19,637 -> 20,468 / 20,315 tok/s and 6.53 -> 6.28 GiB, 24 GiB 24,760 -> 25,747, whole GPU 27,645 -> 28,173 /
# 28,076 (full rows), 27,867 -> 28,806 (chat mix); the same step-10 losses; `bench.dropout_check` there: keep rate,
# independence, the backward's mask the forward's at shares 0.1 and 1. Only where Triton runs (CUDA);
# DROPOUT_MASK_ON_CPU: the op's CPU kernel in compiled layers on a CPU (tests: the compiled path without a GPU).
DROPOUT_MASK_KERNEL = True
DROPOUT_MASK_ON_CPU = False
COMPILED_LIGER = {"rope": False, "rms_norm": False, "swiglu": False}
PACKED_ATTENTION = ("sdpa_varlen", "flash_attention_2", "flash_attention_3", "flex_attention")


def resolve_options(config: RunConfig, device: str, dtype_name: str, liger_installed: bool, *,
                    varlen_available: bool = False, model_config: Any = None,
                    gpu_memory_gb: float | None = None, compile_ok: bool = True, cudnn_ok: bool = False,
                    deferred_ok: bool = True) -> ResolvedOptions:
    """Decide every `auto` knob from the device, the model's shape and the memory budget (pure).
    `compile_ok`: torch.compile can generate GPU code here (Triton installed and the GPU supported);
    `cudnn_ok`: cuDNN's fused attention is available on a GPU it was measured on (speed/sdpa_backend.py);
    `deferred_ok`: trl and transformers are the versions speed/deferred_metrics.py mirrors."""
    t = config.train
    on_cuda = device == "cuda"
    attn = config.model.attn_implementation
    if attn == "auto":
        attn = "sdpa_varlen" if on_cuda and varlen_available else "sdpa"
    # Padding-free packing needs an attention path that keeps packed rows apart without a dense mask.
    packing = t.packing if t.packing != "auto" else (on_cuda and attn in PACKED_ATTENTION)
    liger = t.use_liger_kernel if t.use_liger_kernel != "auto" else (on_cuda and liger_installed)
    optim = t.optim if t.optim != "auto" else ("adamw_torch_fused" if on_cuda else "adamw_torch")
    # peft's kbit preparation casts norms and embeddings to fp32: in bf16 that only adds casts and memory.
    upcast = t.fp32_upcast if t.fp32_upcast != "auto" else dtype_name != "bfloat16"
    layers: int | None = None
    # cuDNN's attention for full-length packs; the plans count what it keeps more (estimate.DENSE_ATTENTION_HIDDEN)
    cudnn = on_cuda and cudnn_ok and CUDNN_ATTENTION
    save_dropout = True
    compiled = on_cuda and compile_ok and (COMPILE_LAYERS if t.compile_layers == "auto" else bool(t.compile_layers))
    activation: float | None = None
    dequantized = 0
    if t.gradient_checkpointing != "auto":
        gc = bool(t.gradient_checkpointing)
    elif not on_cuda or model_config is None:
        gc = on_cuda
    else:
        budget = t.memory_budget_gb or gpu_memory_gb
        # What each un-checkpointed layer keeps with LoRA dropout's masks regenerated in the backward (lean) or
        # kept (plain dropout); compiled layers keep them either way (layer_kept_factor).
        lean = layer_keeps(config, liger=liger, save_dropout_memory=True, compiled=compiled, dense_attention=cudnn)
        plain = layer_keeps(config, liger=liger, save_dropout_memory=False, compiled=compiled, dense_attention=cudnn)
        if compiled and COMPILED_ACTIVATION_BUDGET is not None:  # the bench's fixed share
            layers, activation = 0, COMPILED_ACTIVATION_BUDGET
        elif compiled and budget:
            # The compiler's partitioner recomputes the cheapest parts of every layer (H200: 21,988 tok/s at 24
            # GiB keeping 62%, where 13 checkpointed compiled layers gave 20,092); whole layers are checkpointed
            # only where even a small share does not fit.
            share = activation_share(model_config, config, budget, dtype_name, lean)
            layers = 0 if share >= MIN_ACTIVATION_SHARE else _num_layers(model_config)
            activation = share if MIN_ACTIVATION_SHARE <= share < 1.0 else None
        else:
            layers = checkpointed_layers(model_config, config, budget, dtype_name, lean) if budget else None
        gc = layers != 0
        layers = None if not gc or layers == _num_layers(model_config) else layers
        # Memory to spare: every layer un-checkpointed even with dropout's masks kept, the faster way (H200,
        # session 3: 20,349 vs 19,844 tok/s at the same 3 layers recomputed).
        # (Compiled layers: DropoutLoraA steps aside anyway, and `lean` counted the masks.)
        save_dropout = gc or compiled or not budget or config.lora.lora_dropout == 0 or checkpointed_layers(
            model_config, config, budget, dtype_name, plain) > 0
        if budget and not gc and activation is None and DEQUANTIZE_FROZEN and config.model.load_in_4bit:
            dequantized = dequantized_layers(model_config, config, budget, dtype_name,
                                             lean if save_dropout else plain)
    return ResolvedOptions(device=device, gradient_checkpointing=bool(gc), packing=bool(packing),
                           use_liger_kernel=bool(liger), optim=optim,
                           bf16=dtype_name == "bfloat16", fp16=dtype_name == "float16",
                           attn_implementation=attn, checkpointed_layers=layers, fp32_upcast=bool(upcast),
                           lean_lora=bool(t.lean_lora if t.lean_lora != "auto" else True),
                           save_dropout_memory=bool(save_dropout),
                           compile_layers=compiled, activation_budget=activation if compiled else None,
                           compact_loss=device == "cpu", cudnn_attention=cudnn,
                           dequantized_layers=dequantized, deferred_metrics=DEFERRED_METRICS and deferred_ok,
                           lagged_logs=on_cuda and LAGGED_LOGS and DEFERRED_METRICS and deferred_ok,
                           host_label_positions=on_cuda and HOST_LABEL_POSITIONS)


def layer_keeps(config: RunConfig, *, liger: bool, save_dropout_memory: bool, compiled: bool,
                dense_attention: bool) -> LayerKeeps:
    """What each un-checkpointed layer keeps under these decisions (estimate.LayerKeeps): built here only, so
    resolve_options' trials and planned_memory's count of the resolved plan cannot count a layer differently."""
    return LayerKeeps(liger=liger, dense_attention=dense_attention,
                      dropout_factor=layer_kept_factor(config, save_dropout_memory=save_dropout_memory,
                                                       compiled=compiled))


def layer_kept_factor(config: RunConfig, *, save_dropout_memory: bool, compiled: bool) -> float:
    """How much more than the lean figure an un-checkpointed layer keeps (LayerKeeps.dropout_factor): LoRA
    dropout's masks and dropped inputs, kept by plain dropout and by compiled layers (DropoutLoraA steps aside
    under the compiler)."""
    if config.lora.lora_dropout == 0:
        return 1.0
    if compiled:
        return families.PLAIN_DROPOUT_FACTOR
    return 1.0 if save_dropout_memory else families.PLAIN_DROPOUT_FACTOR


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _num_layers(model_config: Any) -> int:
    return model_shape(model_config).num_layers


def checkpointed_layers(model_config: Any, config: RunConfig, budget_gb: float, dtype_name: str,
                        keeps: LayerKeeps = LayerKeeps()) -> int:
    """The fewest decoder layers to checkpoint so that a step fits `budget_gb` (all of them if none fits),
    by the one memory model (estimate.estimate_memory)."""
    layers = _num_layers(model_config)
    for recomputed in range(layers + 1):
        peak = estimate_memory(model_config, config, recomputed_layers=recomputed, keeps=keeps, device="cuda",
                               dtype_name=dtype_name)
        if peak.total_gib <= BUDGET_SHARE * budget_gb:
            return recomputed
    return layers


def activation_share(model_config: Any, config: RunConfig, budget_gb: float, dtype_name: str,
                     keeps: LayerKeeps = LayerKeeps()) -> float:
    """The largest share of each compiled layer's activations that the compiler may keep for a step to fit
    `budget_gb` by the one memory model (1.0: all of them fit; rounded down to a hundredth)."""
    def peak(share: float) -> float:
        return estimate_memory(model_config, config, recomputed_layers=0, keeps=keeps, device="cuda",
                               dtype_name=dtype_name, kept_share=share).total_gib

    full, floor, target = peak(1.0), peak(0.0), BUDGET_SHARE * budget_gb
    if full <= target:
        return 1.0
    return max(0.0, math.floor(100 * (target - floor) / (full - floor)) / 100)


def dequantized_layers(model_config: Any, config: RunConfig, budget_gb: float, dtype_name: str,
                       keeps: LayerKeeps = LayerKeeps()) -> int:
    """How many decoder layers' frozen 4-bit weights fit as 16-bit copies in `budget_gb` once every layer keeps all
    its activations (the one memory model; 0 where even that does not fit)."""
    def peak(copies: int) -> float:
        return estimate_memory(model_config, config, recomputed_layers=0, keeps=keeps, device="cuda",
                               dtype_name=dtype_name, dequantized_layers=copies).total_gib

    layers, target = _num_layers(model_config), BUDGET_SHARE * budget_gb
    if peak(0) > target:
        return 0
    per_layer = (peak(layers) - peak(0)) / max(1, layers)
    return min(layers, int((target - peak(0)) // per_layer)) if per_layer > 0 else layers


def planned_memory(model_config: Any, config: RunConfig, device: str, *, liger_installed: bool,
                   gpu_memory_gb: float | None = None, trainable_params: int | None = None,
                   cudnn_ok: bool = False) -> MemoryEstimate:
    """The peak memory of the run the trainer would plan on `device` (a GPU of `gpu_memory_gb`, or
    train.memory_budget_gb): `resolve_options` decides checkpointing, layers and Liger, then the one memory
    model counts it. What the Settings tab shows. `cudnn_ok`: the GPU takes cuDNN's attention (resolve_options)."""
    dtype_name = config.model.dtype if config.model.dtype != "auto" else (
        "bfloat16" if device == "cuda" else "float32")
    opts = resolve_options(config, device, dtype_name, liger_installed, model_config=model_config,
                           gpu_memory_gb=gpu_memory_gb, cudnn_ok=cudnn_ok)
    layers = _num_layers(model_config)
    recomputed = 0 if not opts.gradient_checkpointing else (
        layers if opts.checkpointed_layers is None else opts.checkpointed_layers)
    keeps = layer_keeps(config, liger=opts.use_liger_kernel, save_dropout_memory=opts.save_dropout_memory,
                        compiled=opts.compile_layers, dense_attention=opts.cudnn_attention)
    return estimate_memory(model_config, config, recomputed_layers=recomputed, keeps=keeps,
                           kept_share=opts.activation_budget or 1.0, dequantized_layers=opts.dequantized_layers,
                           device=device, dtype_name=dtype_name, trainable_params=trainable_params)


def sft_config_kwargs(config: RunConfig, opts: ResolvedOptions, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """The SFTConfig arguments for a run (pure, so tests can check the mapping): every TrainSettings field that
    SFTConfig has under the same name, by name, then what resolve_options decided and the fixed choices."""
    import dataclasses

    from trl import SFTConfig

    t = config.train
    accepted = {f.name for f in dataclasses.fields(SFTConfig)}
    by_name = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name in accepted}
    eval_every = t.eval_steps if (has_eval and t.eval_steps) else None
    return dict(
        by_name,
        output_dir=str(output_dir),
        gradient_checkpointing=opts.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        optim=opts.optim,
        data_seed=t.seed,
        save_strategy="steps",
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        packing=opts.packing,
        padding_free=opts.packing,
        use_liger_kernel=opts.use_liger_kernel,
        **({"liger_kernel_config": dict(COMPILED_LIGER)} if opts.compile_layers and opts.use_liger_kernel else {}),
        bf16=opts.bf16,
        fp16=opts.fp16,
        use_cpu=opts.device == "cpu",
        report_to=report_to_arg(t.report_to),
        project=PROJECT,  # trackio's project (the other trackers take theirs from the environment, trackers.py)
        run_name=Path(output_dir).parent.name,  # runs/<id>/checkpoints -> the run id
        include_num_input_tokens_seen="non_padding",
        # The filter reads every micro-batch's loss on the host (isnan / isinf) to drop a non-finite one from the
        # logged mean; without it a NaN loss is logged as NaN, which says more.
        logging_nan_inf_filter=not opts.deferred_metrics,
        disable_tqdm=not os.isatty(2),
        dataloader_pin_memory=opts.device == "cuda",
        **({"accelerator_config": {"non_blocking": True}} if opts.device == "cuda" and NON_BLOCKING_INPUTS else {}),
    )


def effective_batch(config: RunConfig, n_gpus: int) -> int:
    """Rows (packed sequences, with packing) per optimizer step across every GPU (pure; shown by the app)."""
    t = config.train
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, n_gpus)
