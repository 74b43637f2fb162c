"""What phi3_lora knows about each kind of model: one `ModelFamily` per transformers `model_type`.

Everything that differs between architectures lives here and nowhere else: whether q/k/v and gate/up
are fused (and how the fused rows split), the hints for a target name the model does not have, the
end-of-turn tokens, the training chat template, the sizes of the catalogue's models for offline use,
the measured activation constants of the memory plan, and the per-layer Linear shapes the estimate
counts. Adding a family is one `ModelFamily(...)` in `FAMILIES` below.

Pure: no torch, no transformers at import; a family is picked from a config's `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Activation bytes per token and decoder layer that backward keeps, in units of the compute dtype's
# size, as `a * hidden + b * intermediate` (the layer's input, kept by every layer, is counted in the base).
# With lean_lora's DropoutLoraA a layer keeps its input and attention input/output, the q/k/v copies for
# flash attention, the two norm outputs and the gate/up halves (the SwiGLU output is remade from them):
# 8h + 2i. Measured on an H200 (bench/train_speed.py, Phi-3-mini shape, Liger on, LoRA dropout 0.05,
# 8,192 tokens/step): 5.1 GiB with every layer checkpointed, 23.0 GiB with none, so 0.559 GiB per layer,
# 36.7k units/token against 37.9k counted; the constants below give 0.566. Without Liger (eager RMSNorm and
# SwiGLU keep more, and nothing is remade) a layer kept 0.89 GiB (5.3 -> 33.8 GiB): 1.6x.
# Families not measured on their own use these (the same decoder block: attention + SwiGLU MLP).
ACT_HIDDEN, ACT_INTERMEDIATE = 7.75, 2
NO_LIGER_FACTOR = 1.6
# With LoRA dropout kept the plain way (nn.Dropout + nn.Linear keep the dropped-out input and the mask; no
# SwiGLU remake: lean_lora.install(save_dropout_memory=False)) a layer kept 0.88 GiB instead of 0.56 (H200,
# session 3: 0.88 -> 0.68 with DropoutLoraA, -> 0.56 with the remake; 30.0 vs 21.2 GiB at 29 kept layers).
PLAIN_DROPOUT_FACTOR = 1.6
# The backward pass's working set of one layer (a checkpointed layer's recomputed forward and the gradients in
# flight): about 17h + 6i values per token (Korthikanti et al. 2022, memory-efficient attention, SwiGLU).
RECOMPUTE_HIDDEN, RECOMPUTE_INTERMEDIATE = 17, 6

PHI3_MINI = "microsoft/Phi-3-mini-4k-instruct"

_PHI3_QKV = "Phi-3 fuses q/k/v into qkv_proj; use qkv_proj, or lora.fused_slices for q/k/v slices."
_PHI3_GATE_UP = "Phi-3 fuses gate/up into gate_up_proj; use gate_up_proj, or lora.fused_slices for gate/up slices."
# For a model with separate projections, the fused names of other families.
SEPARATE_HINTS: Mapping[str, str] = {
    "qkv_proj": "This model keeps q_proj, k_proj and v_proj separate (qkv_proj is Phi-3's fused name).",
    "gate_up_proj": "This model keeps gate_proj and up_proj separate (gate_up_proj is Phi-3's name).",
}


@dataclass(frozen=True)
class KnownModel:
    """A catalogue model of this family: what the model picker shows and its sizes for when the Hub is away."""

    name: str                    # Hub id
    label: str
    description: str
    needs_gpu: bool
    config: Mapping[str, Any]    # the config.json fields the estimate and the layer list need


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]                    # transformers `config.model_type` values
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # fused leaf -> slices, in row order
    hints: Mapping[str, str] = field(default_factory=dict)  # a target name the model lacks -> what to use
    end_tokens: tuple[str, ...] = ()                # end-of-turn tokens generation stops at
    training_template: str | None = None            # trl.chat_template_utils name of a {% generation %} template
    force_template: bool = False                    # use it even when the model's own template differs
    qkv_bias: bool = False                          # q/k/v projections carry a bias (counted in the estimate)
    act_hidden: float = ACT_HIDDEN                  # activation constants of the memory plan (see above)
    act_intermediate: float = ACT_INTERMEDIATE
    recompute_hidden: float = RECOMPUTE_HIDDEN      # the backward's working set of one layer (see above)
    recompute_intermediate: float = RECOMPUTE_INTERMEDIATE
    known: tuple[KnownModel, ...] = ()

    def slice_sizes(self, config: Any, fused_name: str) -> dict[str, int]:
        """Output rows of each slice of a fused layer, from the model config: q = heads*head_dim,
        k = v = kv_heads*head_dim (grouped-query attention makes k/v smaller than q); gate = up = intermediate."""
        slices = self.fused[fused_name]
        heads = _cfg(config, "num_attention_heads")
        head_dim = _cfg(config, "head_dim") or _cfg(config, "hidden_size") // heads
        kv = (_cfg(config, "num_key_value_heads") or heads) * head_dim
        rows = {"q": heads * head_dim, "k": kv, "v": kv, "gate": _cfg(config, "intermediate_size"),
                "up": _cfg(config, "intermediate_size")}
        return {s: rows[s] for s in slices}

    def block_linear_shapes(self, hidden: int, intermediate: int, q_rows: int, kv_rows: int
                            ) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder block, under this family's own names."""
        h, i = hidden, intermediate
        separate = {"q_proj": (h, q_rows), "k_proj": (h, kv_rows), "v_proj": (h, kv_rows), "o_proj": (q_rows, h),
                    "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        out: dict[str, tuple[int, int]] = {}
        for name, shape in separate.items():
            group = self.fused_group(name[: -len("_proj")])
            if group is None:
                out[name] = shape
            elif group not in out:
                out[group] = (shape[0], sum(separate[child_name(s)][1] for s in self.fused[group]))
        return out

    def fused_group(self, slice_name: str) -> str | None:
        """The fused layer holding this slice (q -> qkv_proj), or None when the model keeps it separate."""
        return next((g for g, slices in self.fused.items() if slice_name in slices), None)


def child_name(slice_name: str) -> str:
    """q -> q_proj, gate -> gate_proj: the names Llama-style models use for the same projections."""
    return f"{slice_name}_proj"


def _cfg(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


PHI3 = ModelFamily(
    name="phi3", model_types=("phi3",),
    fused={"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")},
    hints={"q_proj": _PHI3_QKV, "k_proj": _PHI3_QKV, "v_proj": _PHI3_QKV, "gate_proj": _PHI3_GATE_UP,
           "up_proj": _PHI3_GATE_UP},
    end_tokens=("<|end|>", "<|endoftext|>"),
    # The Hub's Phi-3 templates differ by bos/system handling; trl's variant is the reference.
    training_template="phi3_training_chat_template", force_template=True,
    known=(
        KnownModel(PHI3_MINI, "Phi-3-mini-4k-instruct (3.8B)", "Microsoft's 3.8B instruct model from the Hub; "
                   "QLoRA fits in ~6 GB of GPU memory.", True,
                   {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192,
                    "vocab_size": 32064, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "tie_word_embeddings": False, "pad_token_id": 32000}),
        KnownModel("microsoft/Phi-3.5-mini-instruct", "Phi-3.5-mini-instruct (3.8B)", "Phi-3.5 with a 128k "
                   "context; same fused layers as Phi-3.", True,
                   {"model_type": "phi3", "hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192,
                    "vocab_size": 32064, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "tie_word_embeddings": False, "pad_token_id": 32000}),
    ))

QWEN2 = ModelFamily(
    name="qwen2", model_types=("qwen2",), hints=SEPARATE_HINTS, end_tokens=("<|im_end|>", "<|endoftext|>"),
    # Qwen2.5's own template adds a default system prompt, so plain ChatML does not render like it; trl's
    # Qwen2.5 training template does (checked on probe chats before it is used).
    training_template="qwen2_5_training_chat_template", qkv_bias=True,
    known=(
        KnownModel("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct", "A small Llama-style model from the "
                   "Hub; fine on a CPU for short runs.", False,
                   {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
                    "vocab_size": 151936, "num_attention_heads": 14, "num_key_value_heads": 2,
                    "tie_word_embeddings": True}),
    ))

LLAMA = ModelFamily(
    name="llama", model_types=("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                               "granite", "smollm3", "phi"),
    hints=SEPARATE_HINTS, end_tokens=("<|im_end|>", "<|endoftext|>", "<|eot_id|>"))

# Anything else transformers loads: separate names assumed, no hints, only the tokenizer's EOS to stop at.
OTHER = ModelFamily(name="other", model_types=())

FAMILIES: tuple[ModelFamily, ...] = (PHI3, QWEN2, LLAMA)
_BY_TYPE: dict[str, ModelFamily] = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_or_config: Any) -> ModelFamily:
    """The family of a model, its config, a config.json dict or a `model_type` string; OTHER when unknown."""
    if isinstance(model_or_config, str):
        kind = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        kind = _cfg(config, "model_type") or ""
    return _BY_TYPE.get(kind, OTHER)


def all_fused() -> dict[str, tuple[str, ...]]:
    """Every fused layer any family has -> its slices (what adapter weight names can carry)."""
    return {g: s for f in FAMILIES for g, s in f.fused.items()}


def sibling_layers(model: Any) -> list[tuple[Any, ...]]:
    """Each module's separate projections that read one input (q/k/v, gate/up: the slices of a fused layer of
    any family), in the fused layer's row order; only where the parent has all of them."""
    groups = [tuple(child_name(s) for s in slices) for slices in all_fused().values()]
    found = []
    for parent in model.modules():
        children = parent._modules  # not getattr: a missing name raises inside nn.Module, ~100x slower
        for names in groups:
            members = tuple(children.get(name) for name in names)
            if all(m is not None for m in members):
                found.append(members)
    return found


def end_tokens() -> tuple[str, ...]:
    """Every family's end-of-turn tokens (generation stops at those the vocabulary has)."""
    return tuple(dict.fromkeys(t for f in FAMILIES for t in f.end_tokens))


def known_models() -> tuple[KnownModel, ...]:
    return tuple(m for f in FAMILIES for m in f.known)


def known_config(name: str) -> dict[str, Any] | None:
    """Built-in config sizes of a catalogue model, for when its config.json cannot be read."""
    return next((dict(m.config) for m in known_models() if m.name == name), None)
