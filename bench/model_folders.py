"""The model and tokenizer folders the GPU rows train: the real Phi-3 tokenizer made from the GGUF vocabulary in
tests/assets, a random-weight model of Phi-3-mini's layout, and its Llama-layout copy that Unsloth's fast path reads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_GGUF = ROOT / "tests" / "assets" / "ggml-vocab-phi-3.gguf"


def ensure_tokenizer(folder: Path, gguf: Path = TOKENIZER_GGUF) -> Path:
    """The Phi-3 tokenizer as a transformers folder, made once from the GGUF vocabulary in tests/assets (transformers
    derives the BPE merges from the vocabulary: 40-50 s of every device call until `carry_wheels.sh` made the folder
    here and carried it). A folder that exists but does not load with this transformers is made again."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists():
        try:
            AutoTokenizer.from_pretrained(folder)
            return folder
        except Exception as exc:  # noqa: BLE001 - a folder from another transformers version: rebuild it
            print(f"{folder} does not load ({type(exc).__name__}: {exc}); making it again", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


PHI3_MINI = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32}


def make_phi3_mini(folder: Path, tokenizer_dir: Path, shape: dict[str, int] | None = None,
                   device: str = "cuda") -> Path:
    """A random-weight model of Phi-3's layout (fused qkv and gate_up, the real tokenizer and chat template),
    saved as safetensors: Phi-3-mini's shape (3.8B; built on the GPU in bf16, seconds not minutes) unless `shape`
    gives other Phi3Config sizes (bench/gpu_flow.sh's small models)."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tok.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(vocab_size=32064, **(shape or PHI3_MINI), max_position_embeddings=4096,
                        original_max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                        eos_token_id=[tok.eos_token_id, end], pad_token_id=tok.pad_token_id,
                        tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def make_llama_copy(phi3_dir: Path, folder: Path) -> Path:
    """The same weights as a Llama-layout model (q/k/v and gate/up split out of Phi-3's fused layers; Phi-3
    is a Llama with fused projections): the layout Unsloth's own Phi-3 uploads use and its fast path needs."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    src = AutoConfig.from_pretrained(phi3_dir)
    cfg = LlamaConfig(vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
                      num_hidden_layers=src.num_hidden_layers, num_attention_heads=src.num_attention_heads,
                      num_key_value_heads=src.num_key_value_heads, max_position_embeddings=src.max_position_embeddings,
                      rms_norm_eps=src.rms_norm_eps, rope_theta=getattr(src, "rope_theta", 10000.0),
                      bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
                      dtype="bfloat16")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(phi3_dir.glob("*.safetensors")):
        state.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    q = src.num_attention_heads * (src.hidden_size // src.num_attention_heads)
    kv = src.num_key_value_heads * (src.hidden_size // src.num_attention_heads)
    for name, w in state.items():
        if name.endswith("qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = (
                t.contiguous() for t in w.split([q, kv, kv]))
        elif name.endswith("gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            gate, up = w.chunk(2, dim=0)  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2)
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[name] = w
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(phi3_dir).save_pretrained(folder)
    return folder
