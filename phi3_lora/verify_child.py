"""Load an exported model the way a user would and answer prompts greedily (run by phi3_lora.verify).

This file is a standalone script: it is started as `python -I verify_child.py SPEC.json OUT.json` in a fresh
process and imports only torch, transformers and peft, never phi3_lora, so what it loads is what a user with
plain Hugging Face libraries gets. Kinds:

- adapter: a zip (or folder) from the Export tab; AutoPeftModelForCausalLM reads the base from
  adapter_config.json's base_model_name_or_path, the tokenizer and chat template come from the bundle;
- merged: a standalone transformers folder (AutoModelForCausalLM + AutoTokenizer);
- gguf: a .gguf file, loaded with transformers' GGUF loader (`gguf_file=`), tokenizer from the same file.

SPEC: {"kind", "path", "prompts": [[{role, content}, ...], ...], "expected_ids": [[int, ...], ...],
"stop_ids": [int], "max_new_tokens": int, "dtype": "float32" | "bfloat16" | "float16",
"quantization": null | {BitsAndBytesConfig kwargs}, "device": "cpu" | "cuda"}.
OUT: {"answers": [{"text", "ids", "agreement": [matches, positions]}], "loaded": str, "phi3_lora_imported": bool}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path


def _folder(path: Path, work: Path) -> Path:
    if path.suffix != ".zip":
        return path
    with zipfile.ZipFile(path) as zf:
        zf.extractall(work)
    tops = [p for p in work.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else work


def load(spec: dict, work: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = getattr(torch, spec.get("dtype") or "float32")
    kwargs = {"dtype": dtype, "device_map": spec.get("device") or "cpu"}
    if spec.get("quantization"):
        q = dict(spec["quantization"])
        q["bnb_4bit_compute_dtype"] = dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
    path = Path(spec["path"])
    if spec["kind"] == "adapter":
        from peft import AutoPeftModelForCausalLM

        folder = _folder(path, work)
        model = AutoPeftModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        loaded = f"AutoPeftModelForCausalLM({folder.name}) on base {base}"
    elif spec["kind"] == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        loaded = f"AutoModelForCausalLM({path.name})"
    elif spec["kind"] == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = f"AutoModelForCausalLM(gguf_file={path.name})"
    else:
        raise SystemExit(f"unknown kind {spec['kind']!r}")
    return model.eval(), tokenizer, loaded


def answer(model, tokenizer, messages: list, expected: list, spec: dict) -> dict:
    import torch

    stop = set(spec["stop_ids"])
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=spec["max_new_tokens"],
                             eos_token_id=sorted(stop), pad_token_id=tokenizer.pad_token_id or sorted(stop)[0])
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        ids = new[:cut]
        matches = positions = 0
        if expected:  # teacher-forced: does this model pick the app's token at each step of the app's answer?
            full = torch.cat([enc["input_ids"][0], torch.tensor(expected, device=model.device)])[None]
            logits = model(input_ids=full).logits[0]
            start = enc["input_ids"].shape[1] - 1
            picks = logits[start:start + len(expected)].argmax(-1).tolist()
            matches, positions = sum(int(a == b) for a, b in zip(picks, expected)), len(expected)
    return {"text": tokenizer.decode(ids, skip_special_tokens=True), "ids": ids, "agreement": [matches, positions],
            "pieces": [tokenizer.decode([t]) for t in ids]}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as work:
        model, tokenizer, loaded = load(spec, Path(work))
        answers = [answer(model, tokenizer, m, e, spec) for m, e in zip(spec["prompts"], spec["expected_ids"])]
    result = {"answers": answers, "loaded": loaded, "phi3_lora_imported": "phi3_lora" in sys.modules}
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
