"""`python -m phi3_lora validate|train|chat|compare|runs|stop|resume|evaluate|export|bench`.

Config flags are generated from the `RunConfig` dataclasses (one flag per field, named
`--section.field`, with the field's help text), so the CLI, the YAML and the UI can never
disagree. A `UserError` is printed as one message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import textwrap
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator

from phi3_lora import config as cfgmod
from phi3_lora.errors import UserError


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--section.field` flag per RunConfig field; values are parsed by the config's own coercion."""
    for section, cls in cfgmod.SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings ({cls.__doc__.strip().splitlines()[0]})")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=None, metavar="V",
                               help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> cfgmod.RunConfig:
    """--config FILE, then --preset, then shortcut flags, then --section.field flags (later wins)."""
    config = cfgmod.load_yaml(args.config) if getattr(args, "config", None) else cfgmod.RunConfig()
    if getattr(args, "preset", None):
        config = cfgmod.preset(args.preset, config)
    overrides: dict[str, dict[str, Any]] = {}
    for shortcut, (section, name) in {"data": ("data", "source"), "model": ("model", "name")}.items():
        if getattr(args, shortcut, None):
            overrides.setdefault(section, {})[name] = getattr(args, shortcut)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            hint = typing.get_type_hints(cfgmod.SECTIONS[section])[name]
            overrides.setdefault(section, {})[name] = cfgmod.parse_text(value, hint)
    return config.replace(**overrides) if overrides else config


# --- commands ------------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from phi3_lora import data, models

    settings = cfgmod.DataSettings(source=args.source, format=args.format,
                                   mapping=dict(kv.split("=", 1) for kv in args.map or []))
    loaded = data.load_data(settings)
    print(f"{loaded.source}: format {loaded.format}, {len(loaded.rows)} usable of {loaded.total_rows} rows")
    for p in loaded.problems:
        print(f"  dropped  {p.location}  {p.field}: {p.message}")
    for w in loaded.warnings:
        print(f"  warning  {w}")
    if args.stats:
        name, reason = models.resolve_name(args.model)
        tok = models.load_tokenizer(name)
        st = data.compute_stats(loaded.rows, tok, args.max_length)
        print(f"tokens ({name}, {reason}):")
        print(format_stats(st))
    return 0


def format_stats(st: Any, width: int = 40) -> str:
    """Token statistics and a text histogram against max length (pure)."""
    from statistics import median

    from phi3_lora.data import histogram_bins

    lengths = st.token_lengths
    lines = [f"  rows {st.rows}, turns/row {st.mean_turns:.1f}, tokens {st.total_tokens:,}"
             + (f", trained (assistant) tokens {st.trained_tokens:,}" if st.trained_tokens is not None else ""),
             f"  length median {median(lengths) if lengths else 0:.0f}, longest {max(lengths, default=0)}, "
             f"max_length {st.max_length}: {st.truncated} row(s) would be truncated, "
             f"{st.untrained_rows} would train on nothing"]
    bins = histogram_bins(lengths, bins=10)
    top = max((b.count for b in bins), default=1)
    for b in bins:
        bar = "#" * max(1 if b.count else 0, round(width * b.count / top))
        over = "  > max_length" if b.start >= st.max_length else ""
        lines.append(f"  {b.start:>6}-{b.end - 1:<6} {b.count:>5} {bar}{over}")
    lines += [f"  warning: {w}" for w in st.warnings]
    return "\n".join(lines)


RUNS_DIR_HELP = "Where run folders go (default: $PHI3_LORA_RUNS, else ./runs)."


def _runs_dir(args: argparse.Namespace) -> Path:
    from phi3_lora.runs import default_runs_dir

    return Path(args.runs_dir) if args.runs_dir else default_runs_dir()


def cmd_train(args: argparse.Namespace) -> int:
    from phi3_lora import jobs, train

    config = config_from_args(args)
    if args.print_config:
        print(cfgmod.dump_yaml(config), end="")
        return 0
    for note in cfgmod.preset_warnings(config):
        print(f"note: {note}", file=sys.stderr)
    if not config.data.source:
        raise UserError("No data given.", hint="Pass --data FILE (or data.source in the YAML).")
    if args.background:
        run_id = jobs.start_run(config, _runs_dir(args))
        print(f"started {run_id} in the background; follow it with: python -m phi3_lora runs --watch {run_id}")
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else _runs_dir(args) / jobs.new_run_id(config)
    jobs.claim_foreground(run_dir, registers=run_dir.parent.resolve() == _runs_dir(args).resolve())
    from phi3_lora.models import resolve_name

    name, reason = resolve_name(config.model.name)
    if config.preset and cfgmod.PRESETS.get(config.preset, {}).get("model", {}).get("name") == config.model.name:
        reason = f"set by the {config.preset} preset"  # resolve_name would say "chosen by you"
    print(f"model: {name}: {reason}\nrun folder: {run_dir}", file=sys.stderr)
    train.pin_single_gpu()  # before anything starts CUDA
    result = train.run(config, run_dir, resume=args.resume)
    print(f"{result.status} after {result.steps} steps in {result.seconds:.0f} s; final loss "
          f"{_fmt(result.final_loss)}, eval loss {_fmt(result.eval_loss)}; adapter: {result.adapter_dir or '-'}")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _engine(adapter: str, model: str | None, four_bit: bool | None):
    from phi3_lora.generate import ChatEngine
    from phi3_lora.adapter_folder import locate_adapter

    ref = locate_adapter(adapter)
    print(f"loading {model or ref.model_name} with adapter {ref.adapter_dir} ...", file=sys.stderr)
    return ChatEngine(model or ref.model_name, ref.adapter_dir,
                      load_in_4bit=ref.load_in_4bit if four_bit is None else four_bit)


def _gen_settings(args: argparse.Namespace):
    from phi3_lora.generate import GenerationSettings

    return GenerationSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)


def cmd_compare(args: argparse.Namespace) -> int:
    engine = _engine(args.adapter, args.model, args.load_in_4bit)
    history = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    base = tuned = ""
    for base, tuned in engine.stream_pair(history, history, _gen_settings(args)):
        pass
    print(side_by_side(base, tuned, width=shutil.get_terminal_size((120, 20)).columns))
    return 0


def side_by_side(left: str, right: str, width: int = 120, titles: tuple[str, str] = ("BASE", "TUNED")) -> str:
    """Two wrapped columns with a divider (pure, for the terminal)."""
    col = max(20, (width - 3) // 2)
    a = [titles[0]] + [""] + sum((textwrap.wrap(p, col) or [""] for p in left.splitlines() or [""]), [])
    b = [titles[1]] + [""] + sum((textwrap.wrap(p, col) or [""] for p in right.splitlines() or [""]), [])
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b))


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args.adapter, args.model, args.load_in_4bit)
    settings = _gen_settings(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    side = "base" if args.base else "tuned"
    print(f"chatting with the {side} model; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        history.append({"role": "user", "content": prompt})
        shown = ""
        print(f"{side}> ", end="", flush=True)
        for text in engine.stream(history, adapter=not args.base, settings=settings):
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
        history.append({"role": "assistant", "content": shown})
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from phi3_lora import jobs

    if args.watch:
        return _watch(args.watch, _runs_dir(args))
    for info in jobs.list_runs(_runs_dir(args)):
        st = info.status
        print(f"{info.run_id:40} {st.state:12} step {st.step}/{st.max_steps}  loss {_fmt(st.loss)}  {st.reason}")
    return 0


def _watch(run_id: str, runs_dir: Path) -> int:
    import time

    from phi3_lora import events

    while True:
        st = events.run_status(runs_dir / run_id)
        print(f"\r{st.state} step {st.step}/{st.max_steps} loss {_fmt(st.loss)}", end="", file=sys.stderr)
        if not st.active:
            print(f"\n{st.state} {st.reason}", file=sys.stderr)
            return 0 if st.state == "finished" else 1
        time.sleep(1)


def cmd_stop(args: argparse.Namespace) -> int:
    from phi3_lora import jobs

    st = jobs.stop_run(args.run_id, _runs_dir(args))
    print(f"{args.run_id}: {st.state} at step {st.step}. {st.reason or st.resume_text}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from phi3_lora import jobs

    from_step, checkpoint = jobs.resume_point(args.run_id, _runs_dir(args))
    jobs.resume_run(args.run_id, _runs_dir(args))
    print(f"resumed {args.run_id} in the background from step {from_step}"
          + (f" ({checkpoint.name})" if checkpoint else ": it never saved a checkpoint"))
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from phi3_lora.generate import GenerationSettings

    default = GenerationSettings()
    p.add_argument("--adapter", required=True, help="A run folder (runs/<id>), a checkpoint or an adapter folder.")
    p.add_argument("--model", default=None, help="Base model; default: the one the adapter was trained on.")
    p.add_argument("--load-in-4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="Load the base in 4-bit (default: as trained).")
    p.add_argument("--system", default=None, help="An optional system prompt.")
    p.add_argument("--temperature", type=float, default=default.temperature, help="0 = greedy, else sampling.")
    p.add_argument("--top-p", dest="top_p", type=float, default=default.top_p)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=default.max_new_tokens)
    p.add_argument("--seed", type=int, default=default.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phi3_lora", description="Fine-tune a chat model with LoRA / QLoRA on your own chat data.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="Check a dataset: format, bad rows with their line, token stats.")
    p.add_argument("source", help="A .jsonl/.json/.csv/.parquet file or a Hub dataset id.")
    p.add_argument("--format", default="auto", choices=cfgmod.DATA_FORMATS)
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="Column mapping, repeatable.")
    p.add_argument("--stats", action="store_true", help="Also tokenize and report lengths (loads a tokenizer).")
    p.add_argument("--model", default="auto", help="Tokenizer for --stats.")
    p.add_argument("--max-length", dest="max_length", type=int, default=cfgmod.TrainSettings.max_length)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="Fine-tune with LoRA / QLoRA (foreground with progress, or --background).",
                       description="Fine-tune. Settings come from --config, then --preset, then flags.")
    p.add_argument("--config", help="A YAML run config (see --print-config).")
    p.add_argument("--preset", choices=cfgmod.PRESET_NAMES, help="Start from a preset.")
    p.add_argument("--data", help="Shortcut for --data.source.")
    p.add_argument("--model", help="Shortcut for --model.name.")
    p.add_argument("--runs-dir", dest="runs_dir", default=None, help=RUNS_DIR_HELP)
    p.add_argument("--run-dir", dest="run_dir", help="Exact run folder (used by the app's background jobs).")
    p.add_argument("--resume", action="store_true", help="Continue from the run folder's newest checkpoint.")
    p.add_argument("--background", action="store_true", help="Start as a background job, as the app does.")
    p.add_argument("--print-config", dest="print_config", action="store_true",
                   help="Print the resulting YAML config and exit.")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="Answer one prompt with the base and the tuned model, side by side.")
    p.add_argument("--prompt", required=True)
    _add_sampling(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("chat", help="Chat in the terminal with the tuned (or --base) model.")
    p.add_argument("--base", action="store_true", help="Chat with the base model (adapter off).")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("runs", help="List runs and their state, or --watch one.")
    p.add_argument("--runs-dir", dest="runs_dir", default=None, help=RUNS_DIR_HELP)
    p.add_argument("--watch", metavar="RUN_ID")
    p.set_defaults(func=cmd_runs)

    for name, func, text in (("stop", cmd_stop, "Stop a run (it saves a checkpoint first)."),
                             ("resume", cmd_resume, "Resume a stopped or interrupted run from its checkpoint.")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_id")
        p.add_argument("--runs-dir", dest="runs_dir", default=None, help=RUNS_DIR_HELP)
        p.set_defaults(func=func)

    for extra in EXTRA_COMMANDS:
        extra(sub)
    return parser


# Other modules (export, bench) register their sub-commands here to keep this file small.
EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):  # only a pass-through command (bench) takes them
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While a command works on a run (export, evaluate), a SIGTERM (kill, a stopped service) interrupts it like
    Ctrl-C, so its `finally` blocks run: temporary merges are removed and holds released instead of left behind."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (a test calling main from a thread): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_extra_commands() -> None:
    import importlib

    for module in ("phi3_lora.export_cli", "phi3_lora.evaluate_cli", "phi3_lora.bench_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if mod.register not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(mod.register)
