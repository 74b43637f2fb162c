"""How much memory a run needs, before it starts: a pure estimate from the model's config.

No library answers "will this QLoRA run fit?" for a given rank, batch and length (accelerate's
`estimate-memory` counts weights only), so this is our own arithmetic. Four parts:

- weights: linear layers of the blocks at 4.127 bits/param with NF4 + double quant (the QLoRA
  paper's figure), everything else (embeddings, norms, head) at the compute dtype;
- adapter: the LoRA parameters in float32 with their gradients and two AdamW moments (16 bytes/param);
- activations: per token, every layer's input (h values); each layer left un-checkpointed keeps
  `act_hidden*h + act_intermediate*i` values (the model family's constants, measured on an H200; more without
  Liger's kernels, with LoRA dropout's masks or with dense attention: LayerKeeps); the backward's working set of
  one layer (`recompute_hidden*h + recompute_intermediate*i`, Korthikanti et al. 2022); on the CPU the float32 logits
  and their gradient (b*s*vocab*8 bytes; on CUDA trl's loss never holds them whole);
- overhead: the CUDA context and allocator slack (none counted on CPU beyond the Python process).

This is the one memory model: the trainer picks how many layers to recompute with it
(`options.checkpointed_layers`), and the Settings tab shows the trainer's plan through it
(`options.planned_memory`), the same number. On the bench's Phi-3-mini QLoRA run at a 24 GiB budget it gives
22.3 GiB (context included, measured excess taken off) for 22.41 GiB allocated (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from phi3_lora import families
from phi3_lora.config import RunConfig

GIB = 2**30
NF4_BITS = 4.127            # 4-bit NF4 + double-quantised scales (QLoRA paper, section 3)
ADAM_BYTES_PER_PARAM = 16   # fp32 weight + fp32 grad + two fp32 AdamW moments
# Full-length packed rows through one batched SDPA call (cuDNN's kernel; speed/packed_attention.py) keep two more
# hidden-sized values per token in each un-checkpointed layer than the varlen kernel (its output in SDPA's layout
# and the copy o_proj reads). H200, 2026-12-02: +3.0 GiB at 32 layers kept, whole GPU and at a 0.62 share; nothing
# at a 0.09 share (the partitioner recomputes them), so counted times the kept share.
DENSE_ATTENTION_HIDDEN = 2.0
CUDA_OVERHEAD_GIB = 0.6     # context + cuBLAS workspace + allocator slack, measured on H100/T4
CPU_OVERHEAD_GIB = 0.4      # torch + transformers in the training process
# On CUDA the parts above count more than PyTorch allocates: 22.6 GiB counted vs 21.2 measured at 24 GiB with 3
# layers recomputed (session 3); issue 19's run (H200, QLoRA full rows) peaked at 22.41 GiB with 1 layer
# recomputed at 24 GiB and 7.33 GiB with 27 at 8 GiB. So the total leaves out that excess: measured on
# Phi-3-mini (3.82B parameters) only, a smaller model gets a proportional share and a bigger one no more.
CUDA_EXCESS_GIB = 1.4
CUDA_EXCESS_MEASURED_PARAMS = 3.82e9


@dataclass(frozen=True)
class ModelShape:
    """The sizes that drive memory, read from a transformers config (or its dict)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    family: families.ModelFamily = families.OTHER  # the layout (fused or separate projections), biases

    @property
    def block_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder block, under the model's own names."""
        return self.family.block_linear_shapes(self.hidden_size, self.intermediate_size,
                                               self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)

    @property
    def block_linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.block_linear_shapes.values())

    @property
    def other_params(self) -> int:
        """Embeddings, the output head (unless tied), the norms and q/k/v biases: kept in 16-bit even with QLoRA."""
        emb = self.vocab_size * self.hidden_size
        biases = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.family.qkv_bias else 0
        return (emb * (1 if self.tied_embeddings else 2) + (2 * self.num_layers + 1) * self.hidden_size
                + self.num_layers * biases)

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.other_params


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise ValueError(f"model config has none of {names}")
    return default


def model_shape(model_config: Any) -> ModelShape:
    """ModelShape from a `PretrainedConfig` or the dict of a config.json (Llama, Phi-3, Qwen2, Mistral ...)."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM in text_config
        cfg = {**cfg, **cfg["text_config"]}
    h = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    return ModelShape(
        hidden_size=h,
        num_layers=int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers")),
        intermediate_size=int(_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h)),
        vocab_size=int(_get(cfg, "vocab_size")),
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(cfg.get("head_dim") or h // heads),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family=families.family_of(cfg),
    )


def lora_parameter_count(shape: ModelShape, config: RunConfig) -> int:
    """LoRA A and B (plus DoRA magnitudes) over the targeted block layers: what peft reports for Llama/Phi-3."""
    lora = config.lora
    table = shape.block_linear_shapes
    wanted = list(table) if lora.target_modules == "all-linear" else [n for n in lora.target_modules if n in table]
    per_layer = sum(lora.r * (table[n][0] + table[n][1]) + (table[n][1] if lora.use_dora else 0)
                    for n in dict.fromkeys(wanted))
    count = per_layer * shape.num_layers
    if lora.target_modules != "all-linear" and "embed_tokens" in lora.target_modules:
        count += lora.r * (shape.vocab_size + shape.hidden_size)
    for name in lora.modules_to_save or []:
        if name in ("lm_head", "embed_tokens"):
            count += shape.vocab_size * shape.hidden_size
    return count


@dataclass(frozen=True)
class LayerKeeps:
    """What each un-checkpointed decoder layer keeps for its backward pass beyond the input every layer keeps:
    the model family's measured figure, moved by how the run computes the layer (estimate_memory's activations).
    One value because the planner's trials (options.checkpointed_layers, activation_share, dequantized_layers)
    and the plan it shows (options.planned_memory) must all count the same layer; options.layer_keeps builds it."""

    liger: bool = True             # Liger's fused kernels; without them families.NO_LIGER_FACTOR times as much
    dropout_factor: float = 1.0    # LoRA dropout's masks and dropped inputs kept: families.PLAIN_DROPOUT_FACTOR
    dense_attention: bool = False  # full-length packs through batched SDPA (cuDNN): DENSE_ATTENTION_HIDDEN*h more


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapter_gib: float        # LoRA weights + grads + AdamW states
    activations_gib: float
    overhead_gib: float
    total_gib: float          # the parts, less correction_gib
    trainable_params: int
    total_params: int
    device: str
    recomputed_layers: int    # decoder layers under gradient checkpointing
    num_layers: int
    correction_gib: float = 0.0  # the measured excess of the parts over what PyTorch allocates (CUDA_EXCESS_GIB)
    notes: tuple[str, ...] = ()
    kept_share: float = 1.0   # compiled layers: the share of their activations the compiler keeps (the rest recomputed)
    dequantized_layers: int = 0  # layers whose frozen 4-bit weights also have a 16-bit copy (in weights_gib)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.recomputed_layers > 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)


def dtype_bytes(config: RunConfig, device: str, dtype_name: str | None = None) -> int:
    """Bytes per activation value: 4 in float32 (the CPU's 'auto' without native bf16), else 2."""
    setting = dtype_name or config.model.dtype
    if setting == "float32" or (setting == "auto" and device == "cpu"):
        return 4
    return 2


def estimate_memory(model_config: Any, config: RunConfig, *, recomputed_layers: int, keeps: LayerKeeps,
                    device: str = "cuda", dtype_name: str | None = None, trainable_params: int | None = None,
                    kept_share: float = 1.0, dequantized_layers: int = 0) -> MemoryEstimate:
    """Peak memory of a training step for `config` on `device` ("cuda" or "cpu") with `recomputed_layers`
    decoder layers checkpointed and each other layer keeping what `keeps` says (Liger's kernels or not, LoRA
    dropout's masks, dense attention on CUDA): what options.resolve_options decided.

    `trainable_params` overrides the LoRA count (pass peft's exact figure when you have one); `kept_share` is the
    share of what `keeps` counts that a compiled layer keeps under the partitioner's activation budget (an upper
    bound: on the H200 a share of 0.10 / 0.50 / 0.62 / 1.0 peaked at 6.5 / 18.6 / 18.7 / 32.6 GiB where this
    counts 7.6 / 19.2 / 22.7 / 33.7, docs/benchmarks.md). `dequantized_layers` decoder layers also hold a 16-bit
    copy of their frozen 4-bit weights (speed/dequantized.py), counted with the weights.
    """
    shape = model_shape(model_config)
    family = shape.family
    t = config.train
    act_bytes = dtype_bytes(config, device, dtype_name)
    four_bit = config.model.load_in_4bit  # bitsandbytes stores NF4 on the CPU as well as on CUDA
    layers = shape.num_layers
    recomputed = max(0, min(layers, recomputed_layers))

    copies = max(0, min(layers, dequantized_layers)) if four_bit else 0
    if four_bit:
        weights = (shape.block_linear_params * (NF4_BITS / 8 + 2 * copies / max(1, layers))
                   + shape.other_params * 2)
    else:
        weights = shape.total_params * act_bytes
    trainable = lora_parameter_count(shape, config) if trainable_params is None else trainable_params
    adapter = trainable * ADAM_BYTES_PER_PARAM

    tokens = t.per_device_train_batch_size * t.max_length
    h, i = shape.hidden_size, shape.intermediate_size
    kept = ((family.act_hidden * h + family.act_intermediate * i - h) * keeps.dropout_factor * kept_share
            * (1.0 if keeps.liger else families.NO_LIGER_FACTOR))
    if keeps.dense_attention and device == "cuda":
        kept += DENSE_ATTENTION_HIDDEN * h * kept_share
    working = family.recompute_hidden * h + family.recompute_intermediate * i
    activations = tokens * act_bytes * (layers * h + (layers - recomputed) * kept + working)
    if device != "cuda":
        activations += tokens * shape.vocab_size * 8           # fp32 logits + their gradient
    overhead = (CUDA_OVERHEAD_GIB if device == "cuda" else CPU_OVERHEAD_GIB) * GIB
    correction = (CUDA_EXCESS_GIB * GIB * min(1.0, shape.total_params / CUDA_EXCESS_MEASURED_PARAMS)
                  if device == "cuda" else 0.0)
    total = weights + adapter + activations + overhead - correction
    notes: list[str] = []
    if recomputed == 0 and kept_share == 1.0 and activations > weights:
        notes.append("Activations dominate: gradient checkpointing would cut them to about "
                     f"{(activations - tokens * act_bytes * layers * kept) / GIB:.1f} GiB (~30% slower steps).")
    return MemoryEstimate(weights_gib=weights / GIB, adapter_gib=adapter / GIB, activations_gib=activations / GIB,
                          overhead_gib=overhead / GIB, total_gib=total / GIB, trainable_params=trainable,
                          total_params=shape.total_params + trainable, device=device,
                          recomputed_layers=recomputed, num_layers=layers, correction_gib=correction / GIB,
                          kept_share=kept_share, dequantized_layers=copies,
                          notes=tuple(notes))


def describe(est: MemoryEstimate) -> str:
    """One line a person can read: total and what it is made of."""
    where = "GPU" if est.device == "cuda" else "RAM"
    copies = (f" (with 16-bit copies of {est.dequantized_layers} of {est.num_layers} layers' 4-bit weights)"
              if est.dequantized_layers else "")
    return (f"~{est.total_gib:.1f} GiB of {where}: weights {est.weights_gib:.2f}{copies}, adapter + AdamW "
            f"{est.adapter_gib:.2f}, activations {est.activations_gib:.2f} "
            + (f"(the compiler keeps {est.kept_share:.0%} of each layer's activations and recomputes the rest), "
               if est.kept_share < 1.0 else
               f"({est.recomputed_layers} of {est.num_layers} layers recomputed by gradient checkpointing), ")
            + f"overhead {est.overhead_gib:.1f}"
            + (f", less {est.correction_gib:.1f} measured excess" if est.correction_gib else ""))


# --- what an export takes on disk ------------------------------------------------------------------------------

MERGED_BYTES_PER_WEIGHT = 2  # a merge is saved in 16-bit (export.merged_dtype: bfloat16, or float16)


def export_bytes(shape: ModelShape, kind: str) -> int:
    """Bytes of the weights of a merged model (`kind` 'merged': 16-bit safetensors) or of its GGUF (`kind` a GGUF
    type: 'f16', or 'q8_0' where a matrix's rows split into blocks of 32, 34 bytes per block), from the shapes alone:
    matrices as the type stores them, vectors (norms, biases) in float32 in a GGUF (gguf_export.storage_type)."""
    from phi3_lora.gguf_export import storage_bytes, storage_type

    embeddings = [(shape.vocab_size, shape.hidden_size)] * (1 if shape.tied_embeddings else 2)  # and the head
    matrices = [(out, inp) for inp, out in shape.block_linear_shapes.values()] * shape.num_layers + embeddings
    vectors = shape.other_params - sum(a * b for a, b in embeddings)  # norms and biases
    if kind == "merged":
        return MERGED_BYTES_PER_WEIGHT * (sum(a * b for a, b in matrices) + vectors)
    return sum(storage_bytes(m, storage_type("", m, kind)) for m in matrices) + storage_bytes((vectors,), "F32")


def export_peak_bytes(shape: ModelShape, kind: str) -> int:
    """Bytes of weights an export holds on disk at its peak: a merge (`kind` 'merged') its 16-bit weights; a GGUF
    export its temporary 16-bit merge, which the GGUF is written from and verified against, and the GGUF together
    (the merge goes when the GGUF is verified)."""
    merged = export_bytes(shape, "merged")
    return merged if kind == "merged" else merged + export_bytes(shape, kind)
