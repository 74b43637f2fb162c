"""Tiny random models around real tokenizers, saved as plain from_pretrained folders (test fixtures build them)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from phi3_lora.embedded import embedded_gguf_path


def _save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tokenizer(source: Path | None) -> PreTrainedTokenizerBase:
    """A tokenizer folder or a .gguf file; default: the embedded SmolLM2 GGUF (no conversion needed)."""
    source = Path(source) if source else embedded_gguf_path()
    return (AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name) if source.suffix == ".gguf"
            else AutoTokenizer.from_pretrained(source))


def build_tiny_phi3(folder: Path, tokenizer_gguf: Path) -> Path:
    """A random 2-layer Phi3ForCausalLM (hidden 64) with the real Phi-3 tokenizer and trl's training template."""
    from transformers import Phi3Config, Phi3ForCausalLM
    from trl.chat_template_utils import phi3_training_chat_template
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    tokenizer.chat_template = phi3_training_chat_template
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                        original_max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=[tokenizer.eos_token_id, end], pad_token_id=tokenizer.pad_token_id,
                        tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Phi3ForCausalLM(config)
    return _save_tiny(model, tokenizer, Path(folder))


def build_tiny_llama(folder: Path, tokenizer_source: Path | None = None) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64, tied embeddings) with the SmolLM2 tokenizer + ChatML template."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = _tokenizer(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return _save_tiny(model, tokenizer, Path(folder))


def build_tiny_qwen2(folder: Path, tokenizer_source: Path | None = None, *, qwen_template: bool = True,
                     tied: bool = True, random_biases: bool = False) -> Path:
    """A random 2-layer Qwen2ForCausalLM (hidden 64, q/k/v biases, grouped-query attention) with the SmolLM2
    tokenizer (it has Qwen's <|im_start|>/<|im_end|>). `qwen_template`: Qwen2.5's own chat template from trl,
    which adds a default system prompt, so phi3_lora must pick trl's Qwen2.5 training template for it (else
    SmolLM2's). `random_biases`: the biases drawn from N(0, 0.5) instead of random init's zeros, so a trained
    change to them (lora.bias all / lora_only) is visible."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template
    tokenizer = _tokenizer(tokenizer_source)
    if qwen_template:
        tokenizer.chat_template = qwen2_5_chat_template
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=end,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        if random_biases:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.5)
    return _save_tiny(model, tokenizer, Path(folder))


def strong_lora_b(peft: torch.nn.Module) -> torch.nn.Module:
    """lora_B far from zero, as after some training: B = 0 (peft's start) would hide a wrong update or gradient."""
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft


def save_strong_adapter(model_dir: Path, out: Path) -> Path:
    """A float32 LoRA adapter (r8, alpha 16, all linear layers, seed 0) with a strong lora_B, saved to `out`: the
    tuned answers then differ from the base ones, so a routing that leaks or drops the update shows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    strong_lora_b(peft).save_pretrained(out)
    return out
