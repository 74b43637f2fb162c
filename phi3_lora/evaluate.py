"""Does the tuned model answer better? Base and tuned answer held-out conversations, scored against the reference.

For each conversation (a run's held-out rows, or a file) the last assistant turn is the reference. The base
and the tuned model answer the turns before it greedily, in left-padded batches, from one copy of the weights
(ChatEngine with its adapter off, then on). Each answer is scored by scores.py (rouge-score, sacrebleu); the
reference's per-token loss under each model counts only the reference's tokens, as the training label mask
marks them. A result is one JSON file, `runs/<id>/eval/<timestamp>.json`; the CLI, the Compare tab and the
model card of every export all show that file, so they show the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from phi3_lora import scores
from phi3_lora.config import TrainSettings
from phi3_lora.errors import UserError
from phi3_lora.runs import RunDir, find_run, write_atomic

EVAL_DIR = RunDir.EVAL
EVAL_ROWS = RunDir.EVAL_ROWS
FORMAT_VERSION = 1
LOSS_TOKEN_BUDGET = 2048  # rows x padded length per loss forward: bounds the logits (tokens x vocab floats)

Messages = list[dict[str, str]]


def eval_dir(folder: Path) -> Path:
    """Where results go: runs/<id>/eval/ (or <folder>/eval/ for a folder given with --out)."""
    return RunDir(folder).eval_dir


def run_dir_of(adapter_dir: Path) -> Path | None:
    """The run folder an adapter belongs to (runs/<id> for runs/<id>/adapter or .../checkpoints/checkpoint-N)."""
    run = find_run(adapter_dir)
    return run.path if run else None


@dataclass
class EvalOptions:
    max_new_tokens: int = TrainSettings.eval_answers_max_new_tokens
    batch_size: int | None = None        # prompts per generate call; None: as many as the KV cache budget holds
    max_seconds: float | None = None     # stop starting new batches after this long (rows left are counted)
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise UserError(f"max_new_tokens must be 1-4096; got {self.max_new_tokens}.")
        if self.batch_size is not None and not 1 <= self.batch_size <= 512:
            raise UserError(f"batch_size must be 1-512; got {self.batch_size}.")


@dataclass
class Item:
    """One conversation to score: the turns before the reference, the reference, and its tokens."""

    row: int                   # 1-based position in the source
    history: Messages
    reference: str
    prompt_tokens: int = 0
    ids: list[int] = field(default_factory=list)      # the whole conversation, reference included
    labels: list[int] = field(default_factory=list)   # -100 everywhere but the reference's trained tokens


@dataclass
class Skipped:
    where: str
    reason: str


# --- rows --------------------------------------------------------------------------------------------

def rows_from_run(run_dir: Path) -> list[dict[str, Any]]:
    """The run's held-out conversations (eval_rows.jsonl), or a UserError that says what to do instead."""
    path = RunDir(run_dir).eval_rows
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise UserError(f"Run {Path(run_dir).name} has no held-out rows (its eval split is empty), so there is "
                        "nothing to score.", hint="Score a file of conversations instead (--data FILE), or train "
                        "with data.eval_fraction above 0.")
    return rows


def rows_from_file(path: str | Path) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """Conversations from a file in any format the Dataset tab reads; unusable rows are reported, not fatal."""
    from phi3_lora import data
    from phi3_lora.config import DataSettings

    loaded = data.load_data(DataSettings(source=str(path), on_invalid="drop"))
    skipped = [Skipped(p.location, f"{p.field}: {p.message}" if p.field else p.message) for p in loaded.problems]
    return loaded.rows, skipped


class Unanswerable(ValueError):
    """A row with no prompt to answer or no reference to score against; the message says which."""


def row_prompt(messages: list[dict[str, Any]]) -> tuple[Messages, str]:
    """A row's prompt and its reference: every turn before the last assistant turn (its system prompt and earlier
    turns included, as training rendered them) and that turn's text. What scoring and Compare's held-out example
    both answer (pure)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise Unanswerable("has no assistant turn, so there is no reference answer to score against.")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not any(m["role"] == "user" for m in history):
        raise Unanswerable("has no user turn before its last assistant turn: nothing to answer.")
    return history, messages[last]["content"]


def prepare(rows: list[dict[str, Any]], tokenizer: Any, context: int, max_new_tokens: int) -> tuple[list[Item], list[Skipped]]:
    """Split each row into history + reference and tokenize it; rows without a reference or too long are skipped."""
    from phi3_lora.data import encode_conversations

    items, skipped = [], []
    for number, row in enumerate(rows, 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        where = f"row {number}"
        if not isinstance(messages, list) or not messages:
            skipped.append(Skipped(where, "has no messages."))
            continue
        try:
            history, reference = row_prompt(messages)
        except Unanswerable as exc:
            skipped.append(Skipped(where, str(exc)))
            continue
        item = Item(number, history, reference)
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)
        item.prompt_tokens = len(prompt["input_ids"])
        full = encode_conversations(tokenizer, [history + [{"role": "assistant", "content": reference}]])[0]
        item.ids = full["input_ids"]
        mask = full.get("assistant_masks") or [1] * len(item.ids)
        item.labels = [t if i >= item.prompt_tokens and mask[i] else -100 for i, t in enumerate(item.ids)]
        longest = max(len(item.ids), item.prompt_tokens + max_new_tokens)
        if longest > context:
            skipped.append(Skipped(where, f"needs {longest} tokens (prompt {item.prompt_tokens}, reference "
                                          f"{len(item.ids) - item.prompt_tokens}, answer up to {max_new_tokens}), "
                                          f"more than the model's context of {context}; it is left out."))
            continue
        items.append(item)
    return items, skipped


def model_context(engine: Any) -> int:
    config = getattr(engine.base, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or getattr(engine.tokenizer, "model_max_length", 4096))


AUTO_BATCH_CAP = 32          # prompts per call at most when chosen automatically (x2: base and tuned rows)
CPU_KV_BUDGET = 1 << 30      # bytes of KV cache an automatic batch may take on a CPU
GPU_KV_FRACTION = 0.3        # of the GPU's free memory


def auto_batch_size(bytes_per_row: int, budget_bytes: int, rows: int, cap: int = AUTO_BATCH_CAP) -> int:
    """The most prompts per generate call whose KV cache fits the budget (at least 1, at most cap and rows).
    Larger batches pay off: each decoding step reads the weights once for every row of the batch, and a
    batch runs until its longest answer ends, so fewer, fuller batches waste fewer steps (20 rows: batch 16
    then 4 took 36.8 s, one batch of 20 took 26.7 s on the 2-core CPU)."""
    return max(1, min(cap, rows, budget_bytes // max(1, bytes_per_row)))


def kv_bytes_per_token(engine: Any) -> int:
    """Bytes of key and value cache one token takes in the engine's model (all layers)."""
    config = engine.base.config
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype_bytes = next(engine.base.parameters()).element_size() if engine.base.dtype.is_floating_point else 2
    return int(config.num_hidden_layers) * 2 * kv_heads * head_dim * max(2, dtype_bytes)


def engine_batch_size(engine: Any, items: list[Item], max_new_tokens: int) -> int:
    """auto_batch_size for these rows on this engine's device: two sequences a row (base and tuned)."""
    import torch

    longest = max((it.prompt_tokens for it in items), default=0) + max_new_tokens
    device = next(engine.base.parameters()).device
    budget = (int(torch.cuda.mem_get_info(device)[0] * GPU_KV_FRACTION) if device.type == "cuda"
              else CPU_KV_BUDGET)
    return auto_batch_size(2 * longest * kv_bytes_per_token(engine), budget, len(items))


# --- generation and loss ------------------------------------------------------------------------------

class Clock:
    """Deadline and Stop for one evaluation; also a transformers StoppingCriteria, so a batch stops mid-way."""

    def __init__(self, max_seconds: float | None, should_stop: Callable[[], bool] | None = None) -> None:
        self.deadline = time.monotonic() + max_seconds if max_seconds else None
        self.should_stop = should_stop or (lambda: False)
        self.fired = False

    def expired(self) -> bool:
        self.fired = self.fired or self.should_stop() or (self.deadline is not None and time.monotonic() > self.deadline)
        return self.fired

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.expired(), dtype=torch.bool, device=input_ids.device)


def batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    """Rows of similar prompt length together: less left padding per batch."""
    ordered = sorted(items, key=lambda it: it.prompt_tokens)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def generate(engine: Any, items: list[Item], batch_size: int, max_new_tokens: int,
             clock: Clock | None = None, *, mix: bool = True) -> dict[int, tuple[str, str]]:
    """row -> (base answer, tuned answer), greedy; rows not reached before the clock fired are absent.
    `mix`: base and tuned rows of a batch in one generate call (engine.answer_pairs); False: a call per side."""
    from phi3_lora.generate import GenerationSettings

    greedy = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens)
    clock = clock or Clock(None)
    out: dict[int, tuple[str, str]] = {}
    for batch in batches(items, batch_size):
        if clock.expired():
            break
        pairs = engine.answer_pairs([it.history for it in batch], greedy, stopping_criteria=[clock], mix=mix)
        if clock.fired:  # cut mid-batch: these answers are incomplete
            break
        out.update({it.row: pair for it, pair in zip(batch, pairs)})
    return out


def reference_losses(engine: Any, items: list[Item], adapter: bool) -> dict[int, tuple[float, int]]:
    """row -> (summed negative log-likelihood of the reference's tokens, their count) under base or tuned."""
    import torch

    out: dict[int, tuple[float, int]] = {}
    pad = engine.tokenizer.pad_token_id or 0
    device = next(engine.base.parameters()).device
    ordered = sorted(items, key=lambda it: len(it.ids))
    start = 0
    while start < len(ordered):
        end = start + 1
        while end < len(ordered) and (end + 1 - start) * len(ordered[end].ids) <= LOSS_TOKEN_BUDGET:
            end += 1
        chunk, start = ordered[start:end], end
        width = max(len(it.ids) for it in chunk)
        ids = torch.tensor([it.ids + [pad] * (width - len(it.ids)) for it in chunk], device=device)
        labels = torch.tensor([it.labels + [-100] * (width - len(it.ids)) for it in chunk], device=device)
        mask = torch.tensor([[1] * len(it.ids) + [0] * (width - len(it.ids)) for it in chunk], device=device)
        with engine.adapter_state(adapter, steady=True) as model:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        for it, row_nll, row_target in zip(chunk, nll, target):
            out[it.row] = (float(row_nll.sum()), int((row_target != -100).sum()))
    return out


# --- one evaluation ----------------------------------------------------------------------------------

def evaluate(engine: Any, rows: list[dict[str, Any]], options: EvalOptions | None = None, *,
             source: str = "", skipped: list[Skipped] | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Score base vs tuned on `rows`; the result dict is what save_result writes."""
    options = options or EvalOptions()
    if not engine.has_adapter:
        raise UserError("No adapter is loaded: there is no tuned model to compare.", hint="Pick a finished run.")
    started = time.monotonic()
    if options.max_rows is not None:
        rows = rows[: options.max_rows]
    items, more_skipped = prepare(rows, engine.tokenizer, model_context(engine), options.max_new_tokens)
    skipped = list(skipped or []) + more_skipped
    if not items:
        reasons = "; ".join(f"{s.where} {s.reason}" for s in skipped[:3])
        raise UserError(f"None of the {len(rows)} conversations can be scored{': ' + reasons if reasons else ''}.",
                        hint="Give conversations that end with an assistant reply (the reference) and fit the "
                             "model's context.")
    clock = Clock(options.max_seconds, should_stop)
    t0 = time.monotonic()
    batch_size = options.batch_size or engine_batch_size(engine, items, options.max_new_tokens)
    answers = generate(engine, items, batch_size, options.max_new_tokens, clock)
    generate_seconds = time.monotonic() - t0
    done = [it for it in items if it.row in answers]
    t0 = time.monotonic()
    base_loss = reference_losses(engine, done, adapter=False) if done else {}
    tuned_loss = reference_losses(engine, done, adapter=True) if done else {}
    loss_seconds = time.monotonic() - t0
    scored = [row_record(it, *answers[it.row], base_loss[it.row], tuned_loss[it.row]) for it in done]
    not_reached = len(items) - len(done)
    return {
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": engine.model_name,
        "adapter": str(engine.adapter_dir),
        "source": source,
        "settings": {"decoding": "greedy", "max_new_tokens": options.max_new_tokens,
                     "batch_size": batch_size, "max_seconds": options.max_seconds},
        "summary": scores.summarise(scored) if scored else {},
        "rows": sorted(scored, key=lambda r: r["change"], reverse=True),
        "skipped": [{"where": s.where, "reason": s.reason} for s in skipped],
        "not_reached": not_reached,
        "complete": not_reached == 0,
        "stopped_by": None if not not_reached else ("stop" if should_stop and should_stop() else "time limit"),
        "timing": {"seconds": round(time.monotonic() - started, 2), "generate_seconds": round(generate_seconds, 2),
                   "loss_seconds": round(loss_seconds, 2), "rows": len(scored)},
    }


def row_record(item: Item, base: str, tuned: str, base_loss: tuple[float, int],
               tuned_loss: tuple[float, int]) -> dict[str, Any]:
    """One scored row (pure). `change` is tuned minus base ROUGE-L: the per-row table sorts by it."""
    base_scores, tuned_scores = scores.answer_scores(base, item.reference), scores.answer_scores(tuned, item.reference)
    tokens = base_loss[1]
    loss = {"base": {"nll_sum": base_loss[0], "per_token": base_loss[0] / tokens if tokens else math.nan},
            "tuned": {"nll_sum": tuned_loss[0], "per_token": tuned_loss[0] / tokens if tokens else math.nan},
            "tokens": tokens} if tokens else None
    prompt = next((m["content"] for m in reversed(item.history) if m["role"] == "user"), "")
    return {"row": item.row, "prompt": prompt, "history": item.history, "reference": item.reference,
            "base": base, "tuned": tuned, "scores": {"base": base_scores, "tuned": tuned_scores}, "loss": loss,
            "change": tuned_scores["rougeL"] - base_scores["rougeL"]}


# --- files -------------------------------------------------------------------------------------------

def save_result(result: dict[str, Any], folder: Path) -> Path:
    """Write eval/<timestamp>.json atomically into a run folder (or any folder); returns the file."""
    out = eval_dir(folder)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=1, ensure_ascii=False, allow_nan=True)
    n = 1
    while True:  # claim the name first (exclusive create): two evaluations in one second (the app and a CLI beside
        path = out / (f"{stamp}.json" if n == 1 else f"{stamp}-{n}.json")  # it) each keep their own file
        try:
            path.open("x").close()
            break
        except FileExistsError:
            n += 1
    try:  # load_results skips the claimed, still empty file as one being written
        write_atomic(path, text)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    result["file"] = str(path)
    return path


def load_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every saved evaluation of a run, oldest first, each with its "file" (for comparing runs and over time)."""
    folder = eval_dir(run_dir)
    results = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a file being written, or not ours
        if isinstance(result, dict) and result.get("version") == FORMAT_VERSION:
            result["file"] = str(path)
            results.append(result)
    return results


def latest_result(run_dir: Path, adapter_dir: Path | None = None) -> dict[str, Any] | None:
    """The newest evaluation of the run (of this adapter or checkpoint, when given)."""
    for result in reversed(load_results(run_dir)):
        if adapter_dir is None or Path(result.get("adapter", "")).resolve() == Path(adapter_dir).resolve():
            return result
    return None


# --- text views of a result (pure; the CLI, the app and the model card use these) ---------------------

def summary_markdown(result: dict[str, Any]) -> str:
    return scores.markdown_table(scores.SUMMARY_HEADERS, scores.summary_table(result["summary"]))


def coverage_line(result: dict[str, Any]) -> str:
    """How many rows the numbers rest on, and why any are missing."""
    parts = [f"{len(result['rows'])} conversations scored ({result.get('source') or 'source not recorded'})"]
    if result.get("not_reached"):
        parts.append(f"{result['not_reached']} not reached ({result.get('stopped_by') or 'time limit'})")
    if result.get("skipped"):
        parts.append(f"{len(result['skipped'])} skipped")
    settings = result.get("settings", {})
    return (", ".join(parts) + f"; greedy answers of up to {settings.get('max_new_tokens')} new tokens; "
            "differences are tuned minus base with a paired bootstrap 95% interval over rows.")


ROW_HEADERS = ("row", "prompt", "reference", "base answer", "tuned answer", "base ROUGE-L", "tuned ROUGE-L",
               "change ROUGE-L", "base loss", "tuned loss")


def row_table(result: dict[str, Any]) -> list[list[Any]]:
    """Per-row values, best change first (numbers stay numbers so a table widget sorts them)."""
    out = []
    for r in result["rows"]:
        loss = r.get("loss") or {}
        out.append([r["row"], r["prompt"], r["reference"], r["base"], r["tuned"],
                    round(r["scores"]["base"]["rougeL"], 1), round(r["scores"]["tuned"]["rougeL"], 1),
                    round(r["change"], 1),
                    round(loss["base"]["per_token"], 3) if loss else None,
                    round(loss["tuned"]["per_token"], 3) if loss else None])
    return out


def card_section(adapter_dir: Path) -> str:
    """The model card's evaluation section: the newest saved result for this adapter, or '' when none exists."""
    run_dir = run_dir_of(adapter_dir)
    result = latest_result(run_dir, adapter_dir) if run_dir else None
    if not result or not result.get("summary"):
        return ""
    return (f"## Evaluation: base vs tuned on held-out conversations\n\n{coverage_line(result)}\n\n"
            f"{summary_markdown(result)}\n\n(from `{EVAL_DIR}/{Path(result['file']).name}`, {result['created']}; "
            "ROUGE-L by rouge-score, chrF and BLEU by sacrebleu, 0-100)\n")


# --- speed -------------------------------------------------------------------------------------------

def speed_comparison(engine: Any, rows: list[dict[str, Any]], batch_size: int | None = None,
                     max_new_tokens: int = 64) -> dict[str, Any]:
    """Time the same greedy answers (base and tuned) batched and one prompt at a time, in this process.
    Batched: `batch_size` prompts, base and tuned rows in one generate call. One by one: a generate call per
    prompt and side (2 x rows calls of one row), the loop a user would write."""
    items, skipped = prepare(rows, engine.tokenizer, model_context(engine), max_new_tokens)
    if not items:
        raise UserError("No conversation can be answered: " + "; ".join(f"{s.where} {s.reason}" for s in skipped[:3]))
    batch_size = batch_size or engine_batch_size(engine, items, max_new_tokens)
    timings, answers = {}, {}
    for name, size in (("batched", batch_size), ("one_by_one", 1)):
        t0 = time.perf_counter()
        answers[name] = generate(engine, items, size, max_new_tokens, mix=size > 1)
        timings[name] = time.perf_counter() - t0
    same = sum(answers["batched"][row] == answers["one_by_one"][row] for row in answers["batched"])
    return {"rows": len(items), "models": 2, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "batched_seconds": round(timings["batched"], 2), "one_by_one_seconds": round(timings["one_by_one"], 2),
            "speedup": round(timings["one_by_one"] / timings["batched"], 2), "identical_answers": same}


def score_run(run_dir: Path, adapter_dir: Path, model_name: str, load_in_4bit: bool, *,
              max_new_tokens: int = TrainSettings.eval_answers_max_new_tokens,
              max_seconds: float | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Load base + adapter, score the run's held-out rows, save the result in the run folder (end of a run).
    A result with no row scored (the time limit or Stop came first) is not saved: the path is None."""
    from phi3_lora.generate import ChatEngine

    started = time.monotonic()
    rows = rows_from_run(run_dir)
    engine = ChatEngine(model_name, adapter_dir, load_in_4bit=load_in_4bit)
    left = None if max_seconds is None else max(1.0, max_seconds - (time.monotonic() - started))
    result = evaluate(engine, rows, EvalOptions(max_new_tokens=max_new_tokens, max_seconds=left),
                      source=f"held-out rows of run {Path(run_dir).name} ({EVAL_ROWS})", should_stop=should_stop)
    return (save_result(result, run_dir) if result["rows"] else None), result
