"""How many decoder layers the memory budget checkpoints, against what the H200 bench measured.

bench/train_speed.py (docs/benchmarks.md, Phi-3-mini shape, QLoRA NF4 r16 all-linear, Liger, 4 x 2048 tokens):
5.1 GiB allocated with every layer checkpointed, 23.0 GiB with none: 0.559 GiB per un-checkpointed layer.
"""

from __future__ import annotations

import pytest

from phi3_lora import families, options
from phi3_lora.config import RunConfig, preset
from phi3_lora.estimate import LayerKeeps, describe, estimate_memory
from phi3_lora.options import checkpointed_layers, resolve_options

PHI3_MINI = {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 8192, "vocab_size": 32064}
MEASURED_ALL_CHECKPOINTED_GIB, MEASURED_PER_LAYER_GIB = 5.1, 0.559
CUDA_CONTEXT_GIB = 0.6


def _config(four_bit: bool = True) -> RunConfig:
    return RunConfig().replace(model={"load_in_4bit": four_bit},
                               lora={"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
                               train={"max_length": 2048, "per_device_train_batch_size": 4})


@pytest.mark.parametrize("budget", [16.0, 22.0, 24.0, 32.0])
def test_the_chosen_layers_fit_the_budget_by_the_measured_figures(budget):
    layers = checkpointed_layers(PHI3_MINI, _config(), budget, "bfloat16")
    peak = MEASURED_ALL_CHECKPOINTED_GIB + (32 - layers) * MEASURED_PER_LAYER_GIB
    assert peak + CUDA_CONTEXT_GIB <= budget
    # and not far under it: at most 2.5 GiB left for the allocator's slack, evaluation and the estimate's error
    assert peak + CUDA_CONTEXT_GIB > budget - 2.5 or layers == 0


def test_24_gib_recomputes_only_a_few_layers_and_a_big_gpu_none():
    assert checkpointed_layers(PHI3_MINI, _config(), 24.0, "bfloat16") <= 4
    assert checkpointed_layers(PHI3_MINI, _config(), 80.0, "bfloat16") == 0
    assert checkpointed_layers(PHI3_MINI, _config(), 5.0, "bfloat16") == 32  # nothing fits: all of them
    counts = [checkpointed_layers(PHI3_MINI, _config(), b, "bfloat16") for b in range(8, 40, 2)]
    assert counts == sorted(counts, reverse=True)


def test_without_liger_or_in_16_bit_more_layers_are_recomputed():
    qlora = checkpointed_layers(PHI3_MINI, _config(), 24.0, "bfloat16")
    assert checkpointed_layers(PHI3_MINI, _config(), 24.0, "bfloat16", LayerKeeps(liger=False)) > qlora
    assert checkpointed_layers(PHI3_MINI, _config(four_bit=False), 24.0, "bfloat16") > qlora


def test_resolve_options_turns_the_budget_into_a_layer_count_on_cuda_only(monkeypatch):
    monkeypatch.setattr(options, "COMPILE_LAYERS", False)  # eager layers (compiled: the share tests below)
    config = _config().replace(train={"memory_budget_gb": 24.0})
    cuda = resolve_options(config, "cuda", "bfloat16", liger_installed=True, varlen_available=True,
                           model_config=PHI3_MINI, gpu_memory_gb=139.0)
    assert cuda.gradient_checkpointing and 0 < cuda.checkpointed_layers < 32
    assert cuda.packing and cuda.use_liger_kernel and cuda.attn_implementation == "sdpa_varlen"
    whole = resolve_options(_config(), "cuda", "bfloat16", liger_installed=True, varlen_available=True,
                            model_config=PHI3_MINI, gpu_memory_gb=139.0)
    assert not whole.gradient_checkpointing  # no budget set: the GPU's own memory, where everything fits
    cpu = resolve_options(config, "cpu", "bfloat16", liger_installed=False, model_config=PHI3_MINI)
    assert not cpu.gradient_checkpointing and not cpu.packing and cpu.checkpointed_layers is None


MEASURED_PLAIN_DROPOUT_PER_LAYER_GIB = 0.88  # nn.Dropout's mask and output kept, no SwiGLU remake (session 3)


@pytest.mark.parametrize("budget", [24.0, 30.0, 34.0, 36.0, 40.0, 139.0])
def test_plain_dropout_only_where_every_layer_fits_un_checkpointed_with_it(budget, monkeypatch):
    """The faster plain dropout (masks kept) is picked only with memory to spare: by the measured figures every
    layer fits un-checkpointed with it; otherwise the leaner DropoutLoraA stays (and the layers it frees).
    (Eager layers: compiled ones always keep the masks, see the compiled-plan test.)"""
    from phi3_lora import options

    monkeypatch.setattr(options, "COMPILE_LAYERS", False)
    config = _config().replace(train={"memory_budget_gb": budget})
    opts = resolve_options(config, "cuda", "bfloat16", liger_installed=True, varlen_available=True,
                           model_config=PHI3_MINI, gpu_memory_gb=139.0)
    plain_peak = MEASURED_ALL_CHECKPOINTED_GIB + 32 * MEASURED_PLAIN_DROPOUT_PER_LAYER_GIB + CUDA_CONTEXT_GIB
    if not opts.save_dropout_memory:
        assert not opts.gradient_checkpointing and plain_peak <= budget
    if budget <= 30.0 or budget >= 36.0:  # 24 and 30 GiB keep DropoutLoraA; 36 GiB and the whole H200 do not
        assert opts.save_dropout_memory is (budget <= 30.0)
    no_dropout = resolve_options(config.replace(lora={"lora_dropout": 0.0}), "cuda", "bfloat16",
                                 liger_installed=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    assert no_dropout.save_dropout_memory  # nothing to choose without dropout
    cpu = resolve_options(config, "cpu", "bfloat16", liger_installed=False, model_config=PHI3_MINI)
    assert cpu.save_dropout_memory


def test_planned_memory_counts_the_plain_dropout_masks(monkeypatch):
    from phi3_lora import options
    from phi3_lora.options import planned_memory

    monkeypatch.setattr(options, "COMPILE_LAYERS", False)  # eager layers (compiled ones: the test below)
    monkeypatch.setattr(options, "DEQUANTIZE_FROZEN", False)  # the masks alone (copies: test_dequantized.py)

    roomy = planned_memory(PHI3_MINI, _config(), "cuda", liger_installed=True, gpu_memory_gb=139.0)
    lean = planned_memory(PHI3_MINI, _config(), "cuda", liger_installed=True, gpu_memory_gb=30.0)
    assert roomy.recomputed_layers == lean.recomputed_layers == 0
    measured_plain = MEASURED_ALL_CHECKPOINTED_GIB + 32 * MEASURED_PLAIN_DROPOUT_PER_LAYER_GIB
    assert measured_plain <= roomy.total_gib <= measured_plain + 4  # the masks are counted
    assert roomy.total_gib > lean.total_gib + 5


def test_compiled_layers_take_only_the_loss_from_liger(monkeypatch, tmp_path):
    from phi3_lora.options import sft_config_kwargs

    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    opts = resolve_options(_config(), "cuda", "bfloat16", **kw)  # on by default on CUDA (measured, issue 19)
    assert opts.compile_layers and opts.use_liger_kernel
    assert not resolve_options(_config(), "cpu", "bfloat16", liger_installed=False).compile_layers
    args = sft_config_kwargs(_config(), opts, tmp_path, has_eval=False)
    assert args["use_liger_kernel"] and args["liger_kernel_config"] == {"rope": False, "rms_norm": False,
                                                                         "swiglu": False}
    opts.compile_layers = False
    assert "liger_kernel_config" not in sft_config_kwargs(_config(), opts, tmp_path, has_eval=False)


def test_batches_reach_the_gpu_without_the_host_waiting_for_each_copy(tmp_path):
    """On CUDA the data loader pins its batches and accelerate copies them with non_blocking (no wait for the GPU
    per batch tensor); on the CPU there is nothing to copy and neither is asked for."""
    from accelerate.utils import DataLoaderConfiguration
    from transformers.trainer_pt_utils import AcceleratorConfig

    from phi3_lora.options import sft_config_kwargs

    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    gpu = sft_config_kwargs(_config(), resolve_options(_config(), "cuda", "bfloat16", **kw), tmp_path, False)
    assert gpu["dataloader_pin_memory"] and AcceleratorConfig(**gpu["accelerator_config"]).non_blocking
    assert DataLoaderConfiguration(non_blocking=True).non_blocking  # the field accelerate hands the data loader
    cpu = sft_config_kwargs(_config(), resolve_options(_config(), "cpu", "bfloat16", liger_installed=False),
                            tmp_path, False)
    assert not cpu["dataloader_pin_memory"] and "accelerator_config" not in cpu


def test_the_loss_heads_labelled_positions_come_from_the_host_on_a_gpu():
    """On CUDA trl would find them with boolean indexing (two waits per step); speed/label_positions finds them in
    the collator (tests/test_label_positions.py checks the same loss). The CPU keeps trl's path."""
    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    assert resolve_options(_config(), "cuda", "bfloat16", **kw).host_label_positions
    assert not resolve_options(_config(), "cpu", "bfloat16", liger_installed=False).host_label_positions


# H200 2026-12-02, compiled layers, full rows (docs/benchmarks.md): the compiler's kept share -> peak GiB
MEASURED_SHARE_PEAK = {0.10: 6.53, 0.50: 18.60, 0.62: 18.65, 1.0: 32.62}
MEASURED_COMPILED_ALL_CHECKPOINTED = 5.12


@pytest.mark.parametrize("budget", [8.0, 12.0, 24.0, 32.0])
def test_compiled_layers_fit_a_budget_by_the_share_of_activations_the_compiler_keeps(budget):
    """Under a budget, compiled layers are not checkpointed whole: the compiler keeps the share of their
    activations that fits and recomputes the cheapest rest (H200: 21,988 tok/s keeping 62% at 24 GiB, 20,092
    with 13 checkpointed compiled layers). The estimate the share comes from is an upper bound of every measured
    peak, so the plan fits: at each measured share the estimate is above what was measured."""
    from phi3_lora.options import planned_memory

    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    config = _config().replace(train={"memory_budget_gb": budget})
    opts = resolve_options(config, "cuda", "bfloat16", **kw)
    assert opts.compile_layers and not opts.gradient_checkpointing and opts.checkpointed_layers is None
    assert 0.05 <= opts.activation_budget < 1.0
    shown = planned_memory(PHI3_MINI, config, "cuda", liger_installed=True, gpu_memory_gb=139.0)
    assert shown.total_gib <= options.BUDGET_SHARE * budget and shown.kept_share == opts.activation_budget
    assert "the compiler keeps" in describe(shown)
    for share, measured in MEASURED_SHARE_PEAK.items():
        est = estimate_memory(PHI3_MINI, config, recomputed_layers=0, device="cuda", dtype_name="bfloat16",
                              keeps=LayerKeeps(dropout_factor=families.PLAIN_DROPOUT_FACTOR), kept_share=share)
        assert measured <= est.total_gib <= measured + 4.5
    # a larger budget keeps a larger share; the measured neighbour of the plan's share fits the budget
    below = max(s for s in MEASURED_SHARE_PEAK if s <= opts.activation_budget + 0.011)
    assert MEASURED_SHARE_PEAK[below] <= budget
    if budget == 24.0:
        assert opts.activation_budget == 0.62  # the measured 24 GiB row


def test_compiled_plans_at_the_ends_and_with_eager_layers(monkeypatch):
    kw = dict(liger_installed=True, varlen_available=True, model_config=PHI3_MINI, gpu_memory_gb=139.0)
    whole = resolve_options(_config(), "cuda", "bfloat16", **kw)
    assert whole.compile_layers and whole.activation_budget is None and not whole.gradient_checkpointing
    tiny = resolve_options(_config().replace(train={"memory_budget_gb": 6.0}), "cuda", "bfloat16", **kw)
    assert tiny.gradient_checkpointing and tiny.checkpointed_layers is None  # every layer: nothing smaller fits
    assert tiny.activation_budget is None and MEASURED_COMPILED_ALL_CHECKPOINTED <= 6.0
    forced = resolve_options(_config().replace(train={"memory_budget_gb": 24.0, "gradient_checkpointing": True}),
                             "cuda", "bfloat16", **kw)
    assert forced.gradient_checkpointing and forced.activation_budget is None  # the user's choice stands
    assert resolve_options(_config(), "cpu", "bfloat16", liger_installed=False).activation_budget is None
    no_triton = resolve_options(_config().replace(train={"memory_budget_gb": 24.0}), "cuda", "bfloat16",
                                compile_ok=False, **kw)  # e.g. Windows without Triton: eager layers, planned so
    assert not no_triton.compile_layers and no_triton.activation_budget is None
    assert no_triton.gradient_checkpointing and 0 < no_triton.checkpointed_layers <= 4
    off = resolve_options(_config().replace(train={"memory_budget_gb": 24.0, "compile_layers": False}), "cuda",
                          "bfloat16", **kw)  # the user's switch: eager layers, planned as such
    assert not off.compile_layers and off.activation_budget is None and off.checkpointed_layers == \
        no_triton.checkpointed_layers
    no_dropout = resolve_options(_config().replace(train={"memory_budget_gb": 24.0}, lora={"lora_dropout": 0.0}),
                                 "cuda", "bfloat16", **kw)  # no masks to keep: a lean layer, a larger share
    assert no_dropout.activation_budget > 0.62
    monkeypatch.setattr(options, "COMPILE_LAYERS", False)  # eager layers: whole layers checkpointed, as measured
    eager = resolve_options(_config().replace(train={"memory_budget_gb": 24.0}), "cuda", "bfloat16", **kw)
    assert eager.activation_budget is None and eager.gradient_checkpointing and eager.checkpointed_layers <= 4


def test_the_cpu_path_trains_every_layer_unrecomputed_with_the_compact_loss():
    """What the engine turns on and off on a CPU (docs/benchmarks.md, CPU): no recomputation (the 135M model's
    activations fit easily), padded rows (the step keeps the preset's conversations), no Liger (Triton),
    plain AdamW, the loss head on labelled positions only; the dtype is the one models.resolve_dtype chose."""
    cfg = preset("quick-cpu")
    for dtype in ("float32", "bfloat16"):
        opts = resolve_options(cfg, "cpu", dtype, liger_installed=True, model_config=PHI3_MINI)
        assert (opts.gradient_checkpointing, opts.packing, opts.use_liger_kernel, opts.compile_layers) == (
            False, False, False, False)
        assert (opts.optim, opts.attn_implementation, opts.compact_loss, opts.lean_lora) == (
            "adamw_torch", "sdpa", True, True)
        assert (opts.bf16, opts.fp16) == (dtype == "bfloat16", False)
    auto = cfg.replace(train={"gradient_checkpointing": "auto"})
    assert not resolve_options(auto, "cpu", "float32", liger_installed=False, model_config=PHI3_MINI
                               ).gradient_checkpointing
    # trl scores only the labelled positions on CUDA by itself
    assert not resolve_options(_config(), "cuda", "bfloat16", liger_installed=True, model_config=PHI3_MINI,
                               gpu_memory_gb=80.0).compact_loss
