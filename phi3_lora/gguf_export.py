"""Write a transformers model folder as one GGUF file for llama.cpp, Ollama and LM Studio.

Written with the `gguf` package (GGUFWriter, its tensor-name map and its quantisers): no compiled
llama.cpp is needed. The layout follows llama.cpp's own converter, so llama.cpp reads the file as it
reads its own conversions and transformers' GGUF loader reads it back (that is how every export is
verified, see gguf_verify.py):

- Llama: q_proj / k_proj rows are permuted from transformers' rotate-half RoPE layout to the
  interleaved pairs llama.cpp computes RoPE on (transformers' loader permutes them back).
- Phi-3: the fused qkv_proj and gate_up_proj are stored fused (attn_qkv, ffn_up); long-context
  RoPE (Phi-3-*-128k) adds the long/short factor tensors and the attention factor.
- Tokenizer from tokenizer.json: a byte-fallback BPE (sentencepiece style, Phi-3 and Llama 2) is
  llama.cpp's "llama" model with scores recovered from the merge order; a byte-level BPE (SmolLM2,
  Llama 3) is its "gpt2" model with the merges and a named pre-tokenizer.

Tensors are streamed: the header is written from the shapes, then one tensor at a time is read
(safetensors), converted and written, so memory holds one tensor, not the model. The file is written
under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from phi3_lora.errors import UserError
from phi3_lora.runs import temporary_of

GGUF_TYPES = ("f16", "q8_0")
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM (Llama, SmolLM2, TinyLlama, ...)",
                           "phi3": "Phi3ForCausalLM (Phi-3, Phi-3.5-mini)"}

# llama.cpp's token types (gguf.TokenType), spelled out for the pure functions below.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How a byte-level BPE splits text before merging, by the pre-tokenizer of its tokenizer.json, named as
# llama.cpp names it (tokenizer.ggml.pre). The names select a split regex inside llama.cpp.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class Vocab:
    """What a GGUF says about the tokenizer (tokenizer.ggml.*)."""

    model: str  # "llama" (sentencepiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None


# --- pure: architecture checks and metadata -----------------------------------------------------

def check_architecture(config: dict[str, Any]) -> str:
    """The model_type if this module can write it; otherwise a UserError naming the ones it can."""
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        names = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UserError(f"GGUF export does not support the {model_type!r} architecture yet.",
                        hint=f"It writes {names}. Export the merged model instead and convert it with "
                             "llama.cpp's convert_hf_to_gguf.py.")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    allowed = ("default",) if model_type == "llama" else ("default", "longrope", "su")
    if rope_type not in allowed:
        raise UserError(f"GGUF export does not support {model_type} with {rope_type!r} RoPE scaling yet.",
                        hint=f"Supported RoPE types for {model_type}: {', '.join(allowed)}.")
    return model_type


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The `<arch>.*` keys of the GGUF, from a transformers config.json (pure)."""
    arch = check_architecture(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    keys: dict[str, Any] = {
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config.get("num_key_value_heads") or config["num_attention_heads"],
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "rope.freq_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "vocab_size": config["vocab_size"],
    }
    if arch == "llama":
        keys["rope.dimension_count"] = _head_dim(config)
    else:  # phi3
        partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        keys["rope.dimension_count"] = int(partial * config["hidden_size"]) // config["num_attention_heads"]
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        keys["rope.scaling.original_context_length"] = int(original or config["max_position_embeddings"])
        keys["attention.sliding_window"] = int(config.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = config["max_position_embeddings"] / keys["rope.scaling.original_context_length"]
            original_ctx = keys["rope.scaling.original_context_length"]
            keys["rope.scaling.attn_factor"] = (math.sqrt(1 + math.log(scale) / math.log(original_ctx))
                                                if scale > 1.0 else 1.0)
    return keys


def strip_generation_markers(template: str) -> str:
    """The chat template without transformers' {% generation %} markers, which llama.cpp's and Ollama's
    template engines do not know (they only mark the trained tokens; the rendered text is the same)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


# --- pure: tensors --------------------------------------------------------------------------------

def permute_rope(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """transformers' rotate-half q/k rows -> llama.cpp's interleaved RoPE pairs (the inverse of
    transformers' GGUF loader's reverse permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_name(name_map: Any, hf_name: str) -> str | None:
    stem, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, "")
    mapped = name_map.get_name(stem)
    return None if mapped is None else (f"{mapped}.{suffix}" if suffix else mapped)


def storage_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """F32 for vectors (norms, biases, RoPE factors); matrices F16, or Q8_0 where rows split into 32-blocks."""
    if len(shape) < 2 or gguf_name.startswith("rope_"):
        return "F32"
    if gguf_type == "q8_0" and shape[-1] % 32 == 0:
        return "Q8_0"
    return "F16"


def storage_bytes(shape: tuple[int, ...], kind: str) -> int:
    count = int(np.prod(shape))
    return {"F32": count * 4, "F16": count * 2, "Q8_0": count // 32 * 34}[kind]


def encode(array: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    array = array.astype(np.float32, copy=False)
    if kind == "F32":
        return array
    if kind == "F16":
        return array.astype(np.float16)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)


# --- pure: the tokenizer ----------------------------------------------------------------------------

def _merge_pair(merge: Any) -> tuple[str, str]:
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))  # type: ignore[return-value]


def _byte_level_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer; a UserError for one it has no name for."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    kinds = [s.get("type") for s in steps]
    regex = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # = llama.cpp's starcoder split: every digit alone, then GPT-2's regex
    if kinds[:1] == ["Split"] and regex == _LLAMA3_REGEX:
        return "llama-bpe"
    if kinds[:1] == ["Split"] and regex == _QWEN2_REGEX:
        return "qwen2"
    raise UserError(f"GGUF export does not know this tokenizer's pre-tokenizer ({kinds}).",
                    hint="Supported byte-level BPE pre-tokenizers: GPT-2, SmolLM2/StarCoder, Llama 3, Qwen2.")


def build_vocab(tokenizer_json: dict[str, Any], vocab_size: int, *, pre: str | None = None) -> Vocab:
    """The GGUF vocabulary from a tokenizer.json (pure). `vocab_size` is the model's embedding rows: ids past
    the tokenizer are written as unused [PADn] tokens, as llama.cpp does."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}.",
                        hint="Phi-3, Llama and SmolLM2 tokenizers are BPE.")
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens", [])}
    by_id = {int(i): t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    count = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(count)]
    types = [UNUSED if i not in by_id else NORMAL for i in range(count)]
    for i, tok in added.items():
        types[i] = CONTROL if tok.get("special") else USER_DEFINED
    merges = [_merge_pair(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        # Sentencepiece style. llama.cpp merges the best-scoring pair first and transformers rebuilds the
        # merges from the scores, so a token's score is minus the rank of the first merge that makes it.
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        scores = [0.0] * count
        for i, tok in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                types[i] = BYTE
            elif types[i] in (CONTROL, USER_DEFINED):
                scores[i] = -1000.0
            elif types[i] == UNUSED:
                scores[i] = -10000.0
            elif tok in rank:
                scores[i] = -float(rank[tok])
            elif len(tok) > 1:
                scores[i] = -1e9  # in the vocabulary but made by no merge: never preferred
        normalizer = tokenizer_json.get("normalizer") or {}
        steps = normalizer.get("normalizers") or [normalizer]
        prepends = any(s.get("type") == "Prepend" for s in steps) or any(
            s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
            for s in ((tokenizer_json.get("pre_tokenizer") or {}).get("pretokenizers")
                      or [tokenizer_json.get("pre_tokenizer") or {}]))
        return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=None if prepends else False)
    return Vocab("gpt2", pre or _byte_level_pre(tokenizer_json.get("pre_tokenizer")), tokens, types,
                 merges=[f"{a} {b}" for a, b in merges])


# --- side effects: reading the folder, writing the file ---------------------------------------------

def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no safetensors weights.", hint="Merge the adapter first.")
    return files


def _tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) for every weight, one file open at a time."""
    from safetensors import safe_open

    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, (path, name)


def _load(ref: tuple[Path, str]) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(ref[0]), framework="pt") as f:
        return f.get_tensor(ref[1]).float().numpy()


@dataclass
class Planned:
    gguf_name: str
    shape: tuple[int, ...]
    kind: str
    source: Any  # (file, name) of a safetensors tensor, or an array made here


def plan_tensors(model_dir: Path, config: dict[str, Any], gguf_type: str) -> list[Planned]:
    import gguf

    arch = check_architecture(config)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    from safetensors import safe_open

    planned: list[Planned] = []
    for name, ref in _tensors(model_dir):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp (and transformers' loader) use token_embd for the output
        gguf_name = tensor_name(name_map, name)
        if gguf_name is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"GGUF export cannot place the tensor {name!r} of this {arch} model.",
                            hint="The model has layers llama.cpp's layout for it does not know; export merged.")
        with safe_open(str(ref[0]), framework="pt") as f:
            shape = tuple(f.get_slice(name).get_shape())
        planned.append(Planned(gguf_name, shape, storage_type(gguf_name, shape, gguf_type), ref))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if arch == "phi3" and rope.get("long_factor"):
        for key, factors in (("rope_factors_long.weight", rope["long_factor"]),
                             ("rope_factors_short.weight", rope["short_factor"])):
            array = np.asarray(factors, dtype=np.float32)
            planned.append(Planned(key, array.shape, "F32", array))
    return planned


def _prepare(p: Planned, arch: str, config: dict[str, Any]) -> np.ndarray:
    array = p.source if isinstance(p.source, np.ndarray) else _load(p.source)
    if arch == "llama" and (".attn_q." in p.gguf_name or ".attn_k." in p.gguf_name):
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        array = permute_rope(array, heads, heads if ".attn_q." in p.gguf_name else kv)
    return encode(array, p.kind)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, by encoding a word (the tokenizer's own flags vary by class)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bool(ids) and ids[0] == tokenizer.bos_token_id,
            bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)


def turn_end_token(tokenizer: Any, template: str) -> str | None:
    """The special token that ends an assistant turn in this chat template (<|end|>, <|im_end|>, ...)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "u"},
                                              {"role": "assistant", "content": "ANSWER"}],
                                             chat_template=template, tokenize=False)
    after = rendered[rendered.rfind("ANSWER") + len("ANSWER"):]
    specials = sorted(tokenizer.all_special_tokens + [t for t in tokenizer.get_added_vocab()],
                      key=len, reverse=True)
    hits = [(after.find(t), t) for t in specials if t and t in after]
    return min(hits)[1] if hits else tokenizer.eos_token


def write_gguf(model_dir: str | Path, out_path: str | Path, gguf_type: str = "f16", *,
               name: str | None = None, pre: str | None = None) -> Path:
    """Write `model_dir` (a transformers folder, safetensors) as a GGUF file; returns its path.

    `pre`: llama.cpp's pre-tokenizer name when it is known from elsewhere (the embedded model's source GGUF)."""
    import gguf
    from transformers import AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"Unknown GGUF type {gguf_type!r}.", hint=f"Use one of {', '.join(GGUF_TYPES)}.")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = build_vocab(tokenizer_json, config["vocab_size"], pre=pre)
    planned = plan_tensors(model_dir, config, gguf_type)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_of(out_path)  # gguf_bundle.remove_stale_temporaries knows it by its pid once that process is gone
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type("model")
        writer.add_name(name or model_dir.name)
        for key, value in hyperparameters(config).items():
            full = f"{arch}.{key}"
            if isinstance(value, float):
                writer.add_float32(full, value)
            else:
                writer.add_uint32(full, int(value))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, vocab, tokenizer)
        for p in planned:
            qtype = getattr(gguf.GGMLQuantizationType, p.kind)
            dtype = {"F32": np.float32, "F16": np.float16, "Q8_0": np.uint8}[p.kind]
            shape = gguf.quants.quant_shape_to_byte_shape(p.shape, qtype) if p.kind == "Q8_0" else p.shape
            writer.add_tensor_info(p.gguf_name, shape, np.dtype(dtype), storage_bytes(p.shape, p.kind),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            writer.write_tensor_data(_prepare(p, arch, config))
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _add_tokenizer(writer: Any, vocab: Vocab, tokenizer: Any) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, token_id in _special_ids(tokenizer).items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    # phi3_lora trains and answers on the rendered template tokenized without added specials, so a chat
    # model's GGUF must not have llama.cpp add BOS/EOS either (the template writes any it needs).
    add_bos, add_eos = _adds(tokenizer) if not template else (False, False)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if template:
        template = strip_generation_markers(template)
        writer.add_chat_template(template)
        end = turn_end_token(tokenizer, template)
        end_id = tokenizer.convert_tokens_to_ids(end) if end else None
        if end_id is not None and end_id != tokenizer.eos_token_id:
            writer.add_eot_token_id(int(end_id))
