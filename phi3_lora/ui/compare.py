"""Tab 4, Compare: base and tuned answers stream side by side from one loaded copy of the weights.

One ChatEngine per (base model, quantisation, dtype) lives in the app; picking another run of the same base
swaps the adapter (`set_adapter`) instead of loading the weights again.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from phi3_lora import access, portable, spaces
from phi3_lora import config as cfgmod
from phi3_lora.access import Action, Requester
from phi3_lora.errors import UserError
from phi3_lora.generate import GenerationSettings
from phi3_lora.runs import find_run
from phi3_lora.ui.adapters import (adapter_choices, get_engine, hold_checkpoint, is_hub_adapter, resolve_adapter,
                                     resolve_source)
from phi3_lora.ui import evaluation
from phi3_lora.ui.common import AppState, help_md, message_text, notice, run_picker, user_errors
from phi3_lora.ui.guard import check, check_adapter_room, check_model, check_model_fits, guarded, rows_refusal
from phi3_lora.ui.strings import t

SAMPLING = GenerationSettings()  # the defaults both sides start from (generate.py owns them)
# Both chats go to the browser at most once per this many seconds while they grow (the first token at once, the
# whole answers last): every update costs the app a diff of both chats, their JSON and an event on the stream, in
# threads that take the GIL and a core from the decoder (docs/benchmarks.md, CPU, "Compare's updates").
STREAM_EVERY_S = 0.08


@dataclass(slots=True)
class CompareTab:
    source: gr.Dropdown
    refresh: gr.Button
    temperature: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Slider
    seed: gr.Number
    base_chat: gr.Chatbot
    tuned_chat: gr.Chatbot
    prompt: gr.Textbox
    send: gr.Button
    example: gr.Button
    clear: gr.Button
    reference: gr.Markdown
    status: gr.HTML
    system: gr.Textbox   # the system prompt both sides get first, with every message ("": none)
    held_out: gr.State   # the whole context (system, earlier turns, prompt) the shown reference answers; None: none
    scoring: evaluation.EvalPanel
    # set by wire; app.py lists the adapters with it on page load and when the tab opens
    on_refresh: Callable[[str | None], Any] | None = None


def build(state: AppState) -> CompareTab:
    gr.Markdown(t("compare.intro"))
    source, refresh = run_picker(t("compare.adapter"), t("compare.adapter_info"), "p3-compare-source")
    with gr.Accordion(t("compare.generation"), open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=SAMPLING.temperature, step=0.05, label=t("compare.temperature"),
                                    info=t("compare.temperature_info"))
            top_p = gr.Slider(0.05, 1, value=SAMPLING.top_p, step=0.05, label=t("compare.top_p"), info=t("compare.top_p_info"))
            max_new_tokens = gr.Slider(8, 1024, value=SAMPLING.max_new_tokens, step=8, label=t("compare.max_new_tokens"),
                                       info=t("compare.max_new_tokens_info"))
            low, high = cfgmod.field_bounds(cfgmod.TrainSettings, "seed")  # the training seed's range
            seed = gr.Number(SAMPLING.seed, precision=0, minimum=low, maximum=high,
                             label=t("compare.seed"), info=t("compare.seed_info"), elem_id="p3-compare-seed")
    status = gr.HTML(elem_id="p3-compare-status")
    system = gr.Textbox("", label=t("compare.system"), info=t("compare.system_info"), lines=1, max_lines=4,
                        elem_id="p3-system")
    with gr.Row(equal_height=True):
        base_chat = gr.Chatbot(label=t("compare.base"), height=520, elem_id="p3-base-chat",
                               placeholder=t("compare.base_placeholder"))
        tuned_chat = gr.Chatbot(label=t("compare.tuned"), height=520, elem_id="p3-tuned-chat",
                                placeholder=t("compare.tuned_placeholder"))
    reference = gr.Markdown(visible=False, elem_classes=["p3-reference"])
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder=t("compare.prompt_placeholder"), label=t("compare.prompt"), show_label=False,
                            scale=6, lines=1, max_lines=6, elem_id="p3-prompt")
        send = gr.Button(t("compare.send"), variant="primary", scale=1)
    with gr.Row():
        example = gr.Button(t("compare.example"), size="sm")
        clear = gr.Button(t("compare.clear"), size="sm")
    gr.HTML(help_md(t("compare.example_help")))
    scoring = evaluation.build()
    return CompareTab(source, refresh, temperature, top_p, max_new_tokens, seed, base_chat, tuned_chat, prompt,
                      send, example, clear, reference, status, system, gr.State(None), scoring)


def check_size(prompt: str, base: list[dict[str, str]], tuned: list[dict[str, str]], max_prompt: int,
               max_chat: int) -> None:
    """A prompt and a conversation (its system prompt included) a visitor may send: bounded in bytes before
    anything is tokenised."""
    size = len(prompt.encode("utf-8", "replace"))
    if size > max_prompt:
        raise UserError(f"The prompt is {size:,} bytes; the limit is {max_prompt:,}.",
                        hint="Shorten it: Compare is for questions and short conversations.")
    for side in (base, tuned):
        total = size + sum(len(m["content"].encode("utf-8", "replace")) for m in side)
        if total > max_chat:
            raise UserError(f"This conversation has grown to {total:,} bytes; the limit is {max_chat:,}.",
                            hint="Press \"Clear both chats\" and ask again.")


def check_context(engine: Any, base: list[dict[str, str]], tuned: list[dict[str, str]], max_new: int) -> None:
    """The conversation plus the answer must fit in the model's context window."""
    context = getattr(engine.base.config, "max_position_embeddings", None)
    if not context:
        return
    longest = max(len(engine.prompt_ids(base)), len(engine.prompt_ids(tuned)))
    if longest + max_new > context:
        raise UserError(f"The conversation is {longest:,} tokens; with {max_new} new tokens it would not fit in "
                        f"the model's context of {context:,} tokens.",
                        hint="Press \"Clear both chats\", shorten the prompt or lower Max new tokens.")


def _history(chat: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """A chat pane's turns as messages; the system prompt is not among them (it has its own box)."""
    return [{"role": m["role"], "content": message_text(m.get("content"))} for m in chat or []
            if m.get("role") in ("user", "assistant")]


def with_system(system: str | None, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """What a side's model answers: the system prompt first (when there is one), then the turns."""
    return ([{"role": "system", "content": system}] if (system or "").strip() else []) + turns


def _same_context(sent: list[dict[str, str]], held: list[dict[str, str]]) -> bool:
    """`sent` is the held-out context as shown, up to whitespace a text box may add or the send trims."""
    return len(sent) == len(held) and all(a["role"] == b["role"] and a["content"].strip() == b["content"].strip()
                                          for a, b in zip(sent, held))


@dataclass(frozen=True, slots=True)
class HeldOut:
    """A held-out row as Compare shows it: `context` (evaluate.row_prompt: what scoring answers) split into the
    system prompt, the turns before the last user turn, and that turn; `reference` answers exactly `context`."""

    row: int                            # 0-based, in eval_rows.jsonl
    context: list[dict[str, str]]
    reference: str

    @property
    def system(self) -> str:
        return self.context[0]["content"] if self.context[0]["role"] == "system" else ""

    @property
    def earlier(self) -> list[dict[str, str]]:
        return self.context[1 if self.system else 0:-1]

    @property
    def prompt(self) -> str:
        return self.context[-1]["content"]


def eval_example(runs_dir: Path, value: str | None, index: int | None = None) -> HeldOut:
    """One of the run's held-out rows (at random, or at `index`), split as scoring splits it."""
    from phi3_lora.evaluate import Unanswerable, row_prompt

    run = find_run(resolve_source(runs_dir, value))
    file = run.eval_rows if run else None
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if file and file.exists() else []
    if not rows:
        raise UserError("This run has no held-out rows.", hint="Set an eval split above 0 in the Dataset tab for the "
                                                                "next run.")
    i = random.randrange(len(rows)) if index is None else index % len(rows)
    msgs = rows[i]["messages"] if isinstance(rows[i], dict) and "messages" in rows[i] else rows[i]
    try:
        context, reference = row_prompt(msgs)
    except Unanswerable as exc:
        raise UserError(f"Held-out row {i + 1} {exc}", hint="Press \"Held-out example\" again for another row.")
    if context[-1]["role"] != "user":
        raise UserError(f"Held-out row {i + 1} does not end on a user turn before its reference answer.",
                        hint="Press \"Held-out example\" again for another row.")
    return HeldOut(i, context, reference)


PAIR_STEP_NOTES = {  # Compare's compiled pair step on a CPU (phi3_lora/speed/pair_graph.py, pair_artifact.py)
    "compiling": " Compare is preparing a faster way to answer, in a separate background process (about 5 minutes "
                 "on a 2-core CPU, once for this model: a restart of the app reuses it). Until then answers come at "
                 "the usual speed; afterwards answers come faster (greedy ones ~1.3x), greedy or sampled, the same answers (sums "
                 "run in another order, so a near-tie between two words can rarely go the other way).",
    "waiting": " Compare will prepare a faster way to answer (about 5 minutes in the background) once no training run "
               "(or earlier preparation) is going and the machine has the memory for it, so that it never slows a "
               "run down.",
    "ready": " Compare's faster step is prepared: answers come faster (greedy ones ~1.3x), the same answers.",
}


def pair_step_note(phase: str | None) -> str:
    """The sentence Compare's status line adds about its compiled pair step, or nothing."""
    return PAIR_STEP_NOTES.get(phase or "", "")


def wire(tab: CompareTab, state: AppState) -> None:
    runs_dir = state.options.runs_dir

    @user_errors
    def on_refresh(current: str | None) -> Any:
        choices = adapter_choices(runs_dir)
        values = [c[1] for c in choices]
        keep = current in values or spaces.is_hub_repo_id(current or "")  # a typed Hub id stays picked
        return gr.update(choices=choices, value=current if keep else (values[0] if values else None))

    @user_errors
    @guarded(state)
    def on_send(who: Requester, prompt: str, source: str | None, temperature: float, top_p: float, max_new: float,
                seed: Any, base_chat: list | None, tuned_chat: list | None, held_out: list | None = None,
                system: str = "", progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        hub = is_hub_adapter(runs_dir, source)
        check(state, who, Action.COMPARE_HUB if hub else Action.COMPARE)
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("The prompt is empty.", hint="Type a question, or press \"Held-out example\".")
        options = state.options
        check_size(prompt, with_system(system, _history(base_chat)), with_system(system, _history(tuned_chat)),
                   options.max_prompt_bytes, options.max_chat_bytes)
        settings = GenerationSettings(temperature=float(temperature), top_p=float(top_p),
                                      max_new_tokens=int(max_new), seed=int(seed or 0),
                                      max_time=options.max_generation_s)
        if hub:  # a new one is downloaded into the Hub cache: within the room left for visitors' downloads
            check_adapter_room(state, who, (source or "").strip())
        path = resolve_adapter(runs_dir, source, token=access.hub_token(who, None))
        if hub:  # a published adapter names its own base model: never a folder of this server for a visitor
            from phi3_lora.adapter_folder import locate_adapter

            base = locate_adapter(path).model_name
            check_model(state, who, base)
            check_model_fits(state, who, base)
        shown_base = _history(base_chat) + [{"role": "user", "content": prompt}]
        shown_tuned = _history(tuned_chat) + [{"role": "user", "content": prompt}]
        base_hist, tuned_hist = with_system(system, shown_base), with_system(system, shown_tuned)
        # The reference answers the held-out context only: both sides get exactly that context (as scoring
        # renders it, whitespace included), and any other conversation hides the reference.
        held = held_out if isinstance(held_out, list) and held_out else None
        if held and _same_context(base_hist, held) and _same_context(tuned_hist, held):
            base_hist = tuned_hist = [dict(m) for m in held]
            reference = gr.skip()
        else:
            reference = gr.update(visible=False)
        shown_base, shown_tuned = shown_base + [{"role": "assistant", "content": ""}], \
            shown_tuned + [{"role": "assistant", "content": ""}]
        with hold_checkpoint(path):  # until this request ends, the running job does not rotate it away
            yield shown_base, shown_tuned, "", notice("info", "Loading the model (first use only)…"), reference
            engine = get_engine(state, path, progress)
            check_context(engine, base_hist, tuned_hist, settings.max_new_tokens)
            label = f"{portable.model_name(engine.model_name)} + {source}"  # a local base: its folder's name
            started = time.monotonic()
            answers = engine.stream_pair(base_hist, tuned_hist, settings, every=STREAM_EVERY_S)
            for base_text, tuned_text in answers:
                shown_base[-1]["content"], shown_tuned[-1]["content"] = base_text, tuned_text
                yield shown_base, shown_tuned, gr.skip(), notice("info", f"Generating with {label}…"), reference
        took = time.monotonic() - started
        cut = (f" Generation reached the time limit of {settings.max_time:g} s, so an answer may be cut short."
               if settings.max_time and took >= settings.max_time else "")
        yield shown_base, shown_tuned, gr.skip(), notice("warn" if cut else "ok", (
            f"{label}: done (temperature {settings.temperature:g}, top-p {settings.top_p:g}, seed {settings.seed})."
            + cut + pair_step_note(engine.compiled_pair_phase))), reference

    @user_errors
    @guarded(state)
    def on_example(who: Requester, source: str | None) -> tuple[Any, ...]:
        """A fresh conversation on both sides: the row's system prompt in its box, its earlier turns in both
        chats, its last user turn in the prompt box, and the reference that answers exactly that context."""
        why = rows_refusal(state, who, resolve_source(runs_dir, source))
        if why:  # the held-out rows are the data of whoever trained on them
            raise UserError(why, hint="Type a prompt of your own instead: the answers and scores stay visible.")
        held = eval_example(runs_dir, source)
        parts = (["its system prompt (in the box above)"] if held.system else []) + \
            ([f"its {len(held.earlier)} earlier turns"] if held.earlier else [])
        told = (f"Held-out row {held.row + 1}: a fresh conversation with " + " and ".join(parts) + ", as in training. "
                if parts else f"Held-out row {held.row + 1}: a fresh conversation. ") + "Press Send."
        reference = gr.update(value=f"**Reference answer** (held-out row {held.row + 1}):\n\n{held.reference}",
                              visible=True)
        return (held.prompt, reference, held.system, list(held.earlier), list(held.earlier), notice("info", told),
                held.context)

    inputs = [tab.prompt, tab.source, tab.temperature, tab.top_p, tab.max_new_tokens, tab.seed, tab.base_chat,
              tab.tuned_chat, tab.held_out, tab.system]
    outputs = [tab.base_chat, tab.tuned_chat, tab.prompt, tab.status, tab.reference]
    # On ZeroGPU the GPU exists only inside a spaces.GPU call; elsewhere this returns on_send unchanged.
    send = spaces.gpu(on_send, state.options.space_env)
    gr.on([tab.send.click, tab.prompt.submit], send, inputs, outputs, api_name="compare",
          concurrency_id="generate", concurrency_limit=1)
    tab.example.click(on_example, tab.source, [tab.prompt, tab.reference, tab.system, tab.base_chat, tab.tuned_chat,
                                               tab.status, tab.held_out], api_name="heldout_example")
    tab.clear.click(lambda: ([], [], gr.update(visible=False), "", None), None,
                    [tab.base_chat, tab.tuned_chat, tab.reference, tab.status, tab.held_out], api_name="clear_chats")
    tab.refresh.click(on_refresh, tab.source, tab.source, api_name="list_adapters")
    evaluation.wire(tab.scoring, state, tab.source, tab.max_new_tokens)
    tab.on_refresh = on_refresh

