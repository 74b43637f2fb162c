"""`python -m phi3_lora evaluate`: base vs tuned on held-out rows (or a file), scored and saved as JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phi3_lora.config import TrainSettings


def cmd_evaluate(args: argparse.Namespace) -> int:
    from phi3_lora import holds
    from phi3_lora.cli import sigterm_interrupts

    # the app's Delete run refuses the run until this ends (its result is saved into the run), as for the app's own
    with sigterm_interrupts(), holds.hold_adapter(args.adapter, "a command-line evaluation"):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from phi3_lora import evaluate as ev
    from phi3_lora.cli import _engine
    from phi3_lora.errors import UserError
    from phi3_lora.adapter_folder import locate_adapter

    ref = locate_adapter(args.adapter)
    run_dir = ev.run_dir_of(ref.adapter_dir)
    if args.data:
        rows, skipped = ev.rows_from_file(args.data)
        source = f"file {Path(args.data).name}"  # saved in the run folder and shown to visitors: no server path
    elif run_dir is not None:
        rows, skipped, source = ev.rows_from_run(run_dir), [], f"held-out rows of run {run_dir.name} ({ev.EVAL_ROWS})"
    else:
        raise UserError(f"{args.adapter} is not inside a run folder, so it has no held-out rows.",
                        hint="Pass --data FILE with conversations that end in the reference answer.")
    engine = _engine(args.adapter, args.model, args.load_in_4bit)
    if args.bench:
        speed = ev.speed_comparison(engine, rows[: args.max_rows] if args.max_rows else rows, args.batch_size,
                                    args.max_new_tokens)
        print(f"{speed['rows']} rows x 2 models x {speed['max_new_tokens']} new tokens (greedy), {engine.model_name}:")
        print(f"  batched (batch {speed['batch_size']}): {speed['batched_seconds']:.1f} s")
        print(f"  one by one:        {speed['one_by_one_seconds']:.1f} s")
        print(f"  speed-up {speed['speedup']:.2f}x; identical answers in {speed['identical_answers']} of "
              f"{speed['rows']} rows")
        return 0
    options = ev.EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             max_seconds=args.max_seconds, max_rows=args.max_rows)
    result = ev.evaluate(engine, rows, options, source=source, skipped=skipped)
    path = ev.save_result(result, Path(args.out) if args.out else (run_dir or ref.adapter_dir))
    print(format_result(result, args.rows))
    print(f"\nsaved: {path}")
    return 0


def format_result(result: dict[str, Any], shown_rows: int = 5) -> str:
    """The summary table, what it rests on, skipped rows and the rows that changed most (pure)."""
    from phi3_lora import evaluate as ev

    lines = [f"{result['model']} + {result['adapter']}", ev.coverage_line(result), "", ev.summary_markdown(result)]
    for s in result["skipped"]:
        lines.append(f"skipped {s['where']}: {s['reason']}")
    rows = result["rows"]
    if shown_rows and rows:
        lines.append(f"\nrows by change in ROUGE-L (tuned - base), best {min(shown_rows, len(rows))} and worst:")
        picked = rows[:shown_rows] + [r for r in rows[-shown_rows:] if r not in rows[:shown_rows]]
        for r in picked:
            lines.append(f"  row {r['row']:>3} {r['change']:+6.1f}  prompt: {_short(r['prompt'])}")
            lines.append(f"      reference: {_short(r['reference'])}")
            lines.append(f"      base:      {_short(r['base'])}")
            lines.append(f"      tuned:     {_short(r['tuned'])}")
    t = result["timing"]
    lines.append(f"\n{t['seconds']:.1f} s ({t['generate_seconds']:.1f} s generating, batch "
                 f"{result['settings']['batch_size']})")
    return "\n".join(lines)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="Score base vs tuned answers on the run's held-out rows (or --data FILE).",
                       description="Base and tuned answer each held-out conversation greedily; the last assistant "
                                   "turn is the reference. Prints the summary and saves runs/<id>/eval/<time>.json.")
    p.add_argument("--adapter", required=True, help="A run folder (runs/<id>), a checkpoint or an adapter folder.")
    p.add_argument("--data", help="Conversations to score instead of the run's held-out rows (any dataset format).")
    p.add_argument("--model", default=None, help="Base model; default: the one the adapter was trained on.")
    p.add_argument("--load-in-4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="Load the base in 4-bit (default: as trained).")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=TrainSettings.eval_answers_max_new_tokens,
                   help="Answer length limit.")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="Prompts per generate call (default: as many as fit a KV-cache budget, at most 32).")
    p.add_argument("--max-rows", dest="max_rows", type=int, default=None, help="Score at most this many rows.")
    p.add_argument("--max-seconds", dest="max_seconds", type=float, default=None,
                   help="Stop starting new batches after this long; the rows done are scored.")
    p.add_argument("--rows", type=int, default=5, help="Print this many best and worst rows (0: none).")
    p.add_argument("--out", default=None, help="Folder to save eval/<time>.json in (default: the run folder).")
    p.add_argument("--bench", action="store_true",
                   help="Only time the answers batched vs one prompt at a time (same rows, same process) and print both.")
    p.set_defaults(func=cmd_evaluate)
