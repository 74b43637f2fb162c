"""Verify a GGUF export the way a user meets it: a fresh process loads the file with transformers' GGUF
loader and answers the held-out prompts greedily, next to the merged model the file was written from.

The child process (`python -m phi3_lora.gguf_verify ...`) loads the merged model, records its greedy answers
and the logits along them, frees it, loads the GGUF and does the same; it prints one JSON line. The parent
only judges the figures (pure):

- f16 must give the merged model's answers, token for token, with logits within bf16 noise
  (max |difference| <= 2^-7 of the largest logit: a 16-bit float holds 8-11 bits of the value);
- q8_0 must pick the merged model's next token (argmax) on >= 95% of the answer positions.

phi3_lora.verify checks the merged model against the app's own answers (export --merge); this module checks
the next link, GGUF against that merged model, where quantisation needs logit- and argmax-level thresholds
rather than identical answers. The prompts are verify.held_out_prompts, the same ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi3_lora.errors import UserError
from phi3_lora.runs import scrub_paths
from phi3_lora.speed import gguf_once
from phi3_lora.threads import cpu_threads

F16_RELATIVE_TOLERANCE = 2.0 ** -7
Q8_ARGMAX_AGREEMENT = 0.95
MAX_NEW_TOKENS = 32
CHILD_TIMEOUT_S = 1800

Messages = list[dict[str, str]]


@dataclass
class GgufCheck:
    """The verdict on one GGUF file against its merged model."""

    gguf_type: str
    prompts: int
    same_answers: int
    same_prompt_tokens: int
    argmax_agreement: float  # over every answer position, teacher-forced on the merged model's answers
    max_logit_diff: float
    logit_scale: float  # the largest |logit| of the merged model on those positions
    passed: bool
    prompt_source: str
    answers: list[dict[str, Any]] = field(default_factory=list)
    weights_match: bool = False  # the logits along the merged model's own tokens pass this type's threshold
    reader: str = ""  # the transformers version whose GGUF reader the child used
    token_example: dict[str, list[str]] = field(default_factory=dict)  # one prompt both ways, where they differ

    def summary(self) -> str:
        verdict = "verified" if self.passed else "NOT verified"
        rel = self.max_logit_diff / self.logit_scale if self.logit_scale else 0.0
        text = (f"{verdict}: {self.same_answers}/{self.prompts} greedy answers identical to the merged model; "
                f"argmax agreement {self.argmax_agreement:.1%}; max |Δlogit| {self.max_logit_diff:.4f} "
                f"({rel:.2%} of the largest logit); prompt tokens identical {self.same_prompt_tokens}/{self.prompts} "
                f"({self.gguf_type}, {self.prompt_source}).")
        return text + (" " + self.reader_hint() if self.reader_hint() else "")

    def reader_hint(self) -> str:
        """What to do when the file's weights check out but the prompts were tokenized differently: which side
        is wrong cannot be told from here, the GGUF reader of the transformers in use is one suspect (transformers
        5.17's reader drops every space of a Llama-style vocabulary; requirements.txt's version reads it right)."""
        if self.passed or not self.weights_match or self.same_prompt_tokens == self.prompts:
            return ""
        example = "; ".join(f"{side}: {' '.join(tokens[:12])}" for side, tokens in self.token_example.items())
        return (f"The weights give the merged model's logits along its own tokens, but transformers {self.reader}'s "
                f"GGUF reader tokenizes the prompts differently ({example}). Verify again with the transformers "
                f"version in requirements.txt before relying on the file's tokenizer (llama.cpp and Ollama use "
                f"their own).")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def judge(raw: dict[str, Any], gguf_type: str, prompt_source: str) -> GgufCheck:
    """Pass or fail from the child's figures (pure)."""
    rows = raw["rows"]
    positions = sum(r["positions"] for r in rows) or 1
    agreement = sum(r["argmax_agree"] for r in rows) / positions
    diff = max((r["max_logit_diff"] for r in rows), default=0.0)
    scale = max((r["logit_scale"] for r in rows), default=0.0)
    same = sum(r["same_answer"] for r in rows)
    same_prompt = sum(r["same_prompt_tokens"] for r in rows)
    if gguf_type == "f16":
        weights = diff <= F16_RELATIVE_TOLERANCE * max(scale, 1e-6)
        passed = same == len(rows) and same_prompt == len(rows) and weights
    else:
        weights = agreement >= Q8_ARGMAX_AGREEMENT
        passed = weights and same_prompt == len(rows)
    answers = [{"prompt": r["prompt"], "merged": r["merged_answer"], "gguf": r["gguf_answer"]} for r in rows]
    example = next((r["token_example"] for r in rows if not r["same_prompt_tokens"] and r.get("token_example")), {})
    return GgufCheck(gguf_type, len(rows), same, same_prompt, agreement, diff, scale, passed, prompt_source, answers,
                     weights_match=weights, reader=str(raw.get("transformers", "")), token_example=example)


def verify_gguf(gguf_path: Path, merged_dir: Path, prompts: list[Messages], gguf_type: str, prompt_source: str,
                max_new_tokens: int = MAX_NEW_TOKENS, timeout_s: int = CHILD_TIMEOUT_S) -> GgufCheck:
    """Run the check in a fresh Python process and judge its figures."""
    prompt_file = gguf_path.with_name(f".{gguf_path.name}.prompts.json")
    prompt_file.write_text(json.dumps(prompts), encoding="utf-8")
    cmd = [sys.executable, "-m", "phi3_lora.gguf_verify", "--merged", str(merged_dir), "--gguf", str(gguf_path),
           "--prompts", str(prompt_file), "--max-new-tokens", str(max_new_tokens)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise UserError(f"Verifying {gguf_path.name} took longer than {timeout_s} s.",
                        hint="The GGUF is written; verify it on a faster machine.") from None
    finally:
        prompt_file.unlink(missing_ok=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or not last.startswith("{"):
        raise UserError(f"The verification process could not load {gguf_path.name} "
                        f"(exit {done.returncode}): {scrub_paths(done.stderr.strip()[-600:])}",
                        hint="The file may be unreadable by transformers' GGUF loader; do not ship it.")
    return judge(json.loads(last), gguf_type, prompt_source)


# --- the child process ------------------------------------------------------------------------------

def _prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    # Exactly how phi3_lora's ChatEngine prompts: the rendered template, no specials added on top.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(model: Any, prompt: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad(), cpu_threads(ids.device):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=stops[0])
    return out[0, len(prompt):].tolist()


def _forced_logits(model: Any, prompt: list[int], answer: list[int]) -> Any:
    """The logits that predict each token of `answer` after `prompt` (teacher forcing)."""
    import torch

    full = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    with torch.no_grad(), cpu_threads(full.device):
        return model(full).logits[0, len(prompt) - 1:-1].float().cpu()


def _child(merged: Path, gguf: Path, prompts: list[Messages], max_new_tokens: int) -> dict[str, Any]:
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi3_lora.generate import stop_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    stops = stop_token_ids(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).to(device).eval()
    reference = []
    for messages in prompts:
        ids = _prompt_ids(tokenizer, messages)
        answer = _greedy(model, ids, stops, max_new_tokens)
        reference.append((ids, answer, _forced_logits(model, ids, answer)))
    del model
    gc.collect()

    with gguf_once.parsed_once():
        gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).to(device).eval()
    rows = []
    for messages, (ids, answer, ref_logits) in zip(prompts, reference):
        gguf_ids = _prompt_ids(gguf_tokenizer, messages)
        own_answer = _greedy(model, gguf_ids, stops, max_new_tokens)
        logits = _forced_logits(model, ids, answer)
        rows.append({
            "prompt": messages[-1]["content"][:200],
            "same_prompt_tokens": gguf_ids == ids,
            "token_example": {} if gguf_ids == ids else {"merged": tokenizer.convert_ids_to_tokens(ids),
                                                         "gguf": gguf_tokenizer.convert_ids_to_tokens(gguf_ids)},
            "same_answer": own_answer == answer,
            "merged_answer": tokenizer.decode(answer, skip_special_tokens=True),
            "gguf_answer": tokenizer.decode(own_answer, skip_special_tokens=True),
            "positions": len(answer),
            "argmax_agree": int((logits.argmax(-1) == ref_logits.argmax(-1)).sum()),
            "max_logit_diff": float((logits - ref_logits).abs().max()) if len(answer) else 0.0,
            "logit_scale": float(ref_logits.abs().max()) if len(answer) else 0.0,
        })
    import transformers

    return {"rows": rows, "device": device, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load a GGUF with transformers and compare it with its merged model.")
    parser.add_argument("--merged", required=True, type=Path)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts.read_text(encoding="utf-8"))
    print(json.dumps(_child(args.merged, args.gguf, prompts, args.max_new_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
