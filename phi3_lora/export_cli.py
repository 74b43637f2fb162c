"""`python -m phi3_lora export`: the CLI face of phi3_lora.export."""

from __future__ import annotations

import argparse
from typing import Any


def _verified(path: Any) -> None:
    from phi3_lora import verify

    result = verify.load(path)
    if result is not None:
        print(result.report())


def cmd_export(args: argparse.Namespace) -> int:
    from phi3_lora import holds
    from phi3_lora.cli import sigterm_interrupts

    if not (args.zip or args.merge or args.push or args.gguf):
        print("nothing to do: pass --zip DIR, --merge DIR, --gguf OUT and/or --push REPO_ID")
        return 2
    # the app's Delete run refuses the run until this ends, as it does for the app's own exports
    with sigterm_interrupts(), holds.hold_adapter(args.adapter, "a command-line export"):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from phi3_lora import export

    verify = not args.no_verify
    if args.zip:
        path = export.adapter_zip(args.adapter, args.zip, verify=verify)
        print(f"adapter bundle: {path}")
        _verified(path)
    merged = None
    if args.merge:
        merged = export.merge_adapter(args.adapter, args.merge, base=args.merge_base, verify=verify)
        print(f"merged model: {merged}")
        _verified(merged)
    if args.gguf:
        from phi3_lora import gguf_bundle

        result = gguf_bundle.export_gguf(args.adapter, args.gguf, args.gguf_type, merged_dir=merged,
                                         merge_base=args.merge_base, verify=verify)
        print(result.summary())
        for what, command in result.commands.items():
            print(f"{what}: {command}")
        if result.check and not result.check.passed:
            return 1
    if args.push:
        url = export.push_to_hub(args.adapter, args.push, args.token, merged=args.push_merged,
                                 private=not args.public)
        print(f"pushed: {url}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="Bundle the adapter as a zip, merge it into the base, or push it to the Hub; "
                                      "every export is verified by loading it in a fresh process.")
    p.add_argument("--adapter", required=True, help="A run folder (runs/<id>), a checkpoint or an adapter folder.")
    p.add_argument("--zip", metavar="DIR", help="Write <run>-adapter.zip into DIR.")
    p.add_argument("--merge", metavar="DIR", help="Write a merged 16-bit model folder to DIR.")
    p.add_argument("--merge-base", dest="merge_base", choices=("auto", "4bit", "16bit"), default="auto",
                   help="Base weights to merge into: auto = the ones the adapter was trained on (a QLoRA run: the "
                        "dequantised 4-bit base, what Compare answered with), 16bit = the original 16-bit weights.")
    p.add_argument("--gguf", metavar="OUT", help="Write a GGUF (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile "
                   "into the folder OUT (or to OUT if it ends in .gguf), from the merged model (--merge-base).")
    p.add_argument("--gguf-type", dest="gguf_type", default="f16", choices=["f16", "q8_0"],
                   help="f16: the merged model's answers exactly; q8_0: about half the size (default: f16).")
    p.add_argument("--no-verify", dest="no_verify", action="store_true",
                   help="Skip the check that a fresh transformers/peft process answers the held-out prompts as the "
                        "app does (for --gguf: through transformers' GGUF loader, next to the merged model).")
    p.add_argument("--push", metavar="REPO_ID", help="Push to this Hub model repo (your-name/model-name).")
    p.add_argument("--push-merged", dest="push_merged", action="store_true", help="Push the merged model instead.")
    p.add_argument("--public", action="store_true", help="Make the Hub repo public (default: private).")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    p.set_defaults(func=cmd_export)
