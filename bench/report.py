"""From a bench's runs to its tables: one entry per row over its repeats, the same-loss check against the row's
recipe (the loss at SAME_LOSS_STEP), the Markdown tables (training rows, generation) and the sections of
docs/benchmarks.md they replace."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.paired import paired_table
from bench.row_sets import LEARNING_RATE

SAME_LOSS_STEP, SAME_LOSS_TOLERANCE = 10, 0.01


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per row over its repeats: the median repeat's figures, with every repeat's tok/s kept."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in by.items():
        ok = [r for r in rs if "error" not in r and r.get("steps")]
        if not ok:
            out.append(rs[0])
            continue
        ok.sort(key=lambda r: r["tokens_per_s"])
        mid = dict(ok[(len(ok) - 1) // 2])
        mid["repeats_tok_s"] = [r["tokens_per_s"] for r in ok]
        mid["peak_gib"] = max(r.get("peak_gib", 0) for r in ok)
        mid["reserved_gib"] = max(r.get("reserved_gib", 0) for r in ok)
        out.append(mid)
    return out


def same_loss(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float, bool] | None:
    """(row's, reference's loss at SAME_LOSS_STEP, within SAME_LOSS_TOLERANCE) or None if either lacks it."""
    i = SAME_LOSS_STEP - 1
    a, b = (row.get("losses") or [])[i:i + 1], (ref.get("losses") or [])[i:i + 1]
    if not a or not b or a[0] is None or b[0] is None:
        return None
    return a[0], b[0], abs(a[0] - b[0]) <= SAME_LOSS_TOLERANCE * abs(b[0])


def table(results: list[dict[str, Any]]) -> str:
    by_name = {r["name"]: r for r in results if "tokens_per_s" in r}
    lines = ["| row | useful tok/s (median step) | repeats' tok/s | steps' tok/s (min-max) | MFU | "
             "peak GiB (alloc / reserved) | tokens/step | warm-up steps | vs recipe | "
             f"step-{SAME_LOSS_STEP} loss (recipe) | options |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in results:
        if "error" in r or not r.get("steps"):
            lines.append(f"| {r['name']} | failed: {str(r.get('error', 'no timed step'))[:120]} "
                         "| | | | | | | | | |")
            continue
        ref = by_name.get(r.get("recipe_ref") or "")
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and ref is not r else "-"
        check = same_loss(r, ref) if ref and ref is not r else None
        own = (r.get("losses") or [])[SAME_LOSS_STEP - 1:SAME_LOSS_STEP]
        loss = (f"{check[0]:.4f} ({check[1]:.4f}) {'same' if check[2] else 'DIFFERENT'}" if check else
                f"{own[0]:.4f}" if own and own[0] is not None else "-")
        o = r.get("options", {})
        opt = ", ".join(f"{k}={v}" for k, v in o.items() if k in (
            "use_liger_kernel", "gradient_checkpointing", "checkpointed_layers", "dequantized_layers", "liger",
            "checkpointing", "model", "lean_lora", "save_dropout_memory", "compile_layers") and v not in ("", None))
        reps = " / ".join(f"{x:,.0f}" for x in r.get("repeats_tok_s", [r["tokens_per_s"]]))
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {reps} | {r['step_tok_s_min']:,.0f}-"
                     f"{r['step_tok_s_max']:,.0f} | {r['mfu']:.3f} | {r.get('peak_gib', 0):.2f} / "
                     f"{r.get('reserved_gib', 0):.2f} | {r['tokens_per_step']:,.0f} | {r['warmup_steps']}"
                     f"{'' if r.get('settled') else ' (not settled)'} | {ratio} | {loss} | {opt} |")
    return "\n".join(lines)


def gen_table(gen: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | side | tokens/s | time to first token (s) | tokens |", "| --- | --- | ---: | ---: | ---: |"]
    for label, rows in gen.items():
        for g in rows:
            if "error" in g:
                lines.append(f"| {label} | failed: {g['error'][:100]} | | | |")
                continue
            lines.append(f"| {label} | {g['side']} | {g['tokens_per_s']:.1f} | {g['ttft_s']:.3f} | {g['tokens']} |")
    return "\n".join(lines)


def write_markdown(path: Path, section: str, body: str) -> None:
    """Replace (or append) one `## section` of docs/benchmarks.md."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\nWritten by `python -m bench.train_speed`.\n"
    head = f"## {section}"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body.rstrip() + "\n" + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    path.write_text(text, encoding="utf-8")


def repeats_phrase(rows: list[dict[str, Any]]) -> str:
    """How many runs each row has, as the table's header says it: "2 runs", or "1-2 runs" after a merge of calls
    that did not all run every row (pure)."""
    counts = sorted({len(r.get("repeats_tok_s") or [1]) for r in rows}) or [1]
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{span} run{'s' if counts[-1] > 1 else ''} per row (the 'repeats' column)"


def write_gpu_markdown(report: dict[str, Any], args: argparse.Namespace) -> None:
    v = report["versions"]
    title = f"GPU training speed ({v['gpu']})"
    body = (f"## {title}\n\n{report['date']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "gpu")
            + f". Each row in its own process, {repeats_phrase(report['rows'])}, order reversed on odd repeats; "
            f"{max([r.get('steps') or 0 for r in report['runs']] or [0])} timed steps after the warm-up settles "
            f"(at least "
            f"{SAME_LOSS_STEP} steps in all); batch 4, max length 2048, LoRA r16 all-linear, "
            f"dropout 0.05, learning rate {LEARNING_RATE} constant on every row. Host link (pinned): "
            f"{report['host_link']}.\n\n" + table(report["rows"]))
    pairs = paired_table(report["runs"])
    if pairs:
        body += ("\n\nThe same packs (step i of every row trains on the same pack; `bench/paired.py`), each pack's "
                 "fastest run:\n\n" + pairs)
    write_markdown(Path(args.markdown), title, body)
