"""Answer with the base and the tuned model from ONE copy of the weights.

The adapter sits on the loaded base model; peft's mixed-adapter batches let one `generate`
call produce the base answer (row 0, adapter "__base__" = off) and the tuned answer (row 1)
together, with the same sampling settings and seed, streaming both token by token. When a
batch cannot mix adapters (DoRA), the two answers run one after the other, the base one
inside peft's `disable_adapter()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from phi3_lora import adapter_folder, cpu_linear, decoding, families, merging
from phi3_lora.speed import pair_graph
from phi3_lora.decoding import BASE
from phi3_lora.errors import UserError
from phi3_lora.merging import TUNED
from phi3_lora.threads import cpu_threads, release_thread_pool

END_TOKENS = families.end_tokens()  # every family's end-of-turn tokens

Messages = list[dict[str, str]]


@dataclass
class GenerationSettings:
    """Sampling shared by both sides of a comparison."""

    temperature: float = 0.0         # greedy: the same prompt gives the same answers (the CLI's and Compare's default)
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0
    repetition_penalty: float = 1.0
    max_time: float | None = None    # seconds; generation stops there (transformers' MaxTimeCriteria)

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise UserError(f"temperature must be 0-5; got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1]; got {self.top_p}.")
        if not 1 <= self.max_new_tokens <= 8192:
            raise UserError(f"max_new_tokens must be 1-8192; got {self.max_new_tokens}.")

    def generate_kwargs(self) -> dict[str, Any]:
        timing = {"max_time": self.max_time} if self.max_time else {}
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty, **timing}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty, **timing}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat template's end-of-turn tokens that exist in this vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return sorted(ids)


class ChatEngine:
    """One base model, optionally with an adapter, for chat and side-by-side comparison.

    What "base" means here is exactly the untouched base: an adapter that trained biases (lora.bias all or
    lora_only) overwrites bias tensors of the base itself, which disable_adapter() does not undo, so the engine
    keeps the pristine biases and swaps them in for every base-side answer. The prompt is rendered with the chat
    template saved beside the adapter (the one training used), and a 4-bit base is loaded with the run's own
    bitsandbytes settings (`model_settings`, read from the run when not given).
    """

    def __init__(self, model_name: str, adapter_dir: str | Path | None = None, load_in_4bit: bool = False,
                 *, model_settings: Any = None) -> None:
        from phi3_lora import models
        from phi3_lora.config import ModelSettings

        self.model_name, self.reason = models.resolve_name(model_name)
        if model_settings is not None:  # given: exactly these settings
            four_bit = model_settings.load_in_4bit
        else:  # the run's quantisation and dtype, with 4-bit on or off as asked
            four_bit = load_in_4bit
            model_settings = (adapter_folder.run_model_settings(Path(adapter_dir)) if adapter_dir is not None else None) \
                or ModelSettings()
        self.settings = ModelSettings(name=self.model_name, load_in_4bit=four_bit, dtype=model_settings.dtype,
                                      bnb_4bit_quant_type=model_settings.bnb_4bit_quant_type,
                                      bnb_4bit_use_double_quant=model_settings.bnb_4bit_use_double_quant)
        self.tokenizer = models.load_tokenizer(self.model_name)
        self._default_template = self.tokenizer.chat_template
        self.base = models.load_model(self.settings)
        self.base.eval()
        self.model: Any = self.base
        self.adapter_dir: Path | None = None
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._lock = threading.Lock()  # the adapter switch is model-wide state: one generation at a time
        self._pristine = _bias_snapshot(self.base)  # the base's own biases, before any adapter wrote into them
        self._tuned_biases: dict[str, Any] = {}  # biases the current adapter trained (bias all / lora_only)
        self._merged = merging.MergedWeights()  # the tuned side's merged weights, made on first use per adapter
        self._packed = cpu_linear.PackedLinears()  # CPU float32: weights packed for oneDNN, made on first use
        self._compiled_pair = pair_graph.CompiledPair()  # CPU: Compare's compiled pair step (options.COMPILED_PAIR_CPU)
        if adapter_dir:
            self.set_adapter(adapter_dir)
        release_thread_pool()  # loading ran parallel ops here; generation may stream from another thread

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None

    def serve_compare(self, runs_dir: str | Path) -> None:
        """This engine answers the app's Compare: by default (options.COMPILED_PAIR_CPU, float32 on a CPU) its pair
        step compiles in the background, only while no run of `runs_dir` trains (speed/pair_graph.py, background.py).
        Other engines (CLI, evaluation) compile it only with PHI3_LORA_COMPILED_PAIR=1."""
        self._compiled_pair.runs_dir = Path(runs_dir)
        self._compiled_pair.by_default = True

    @property
    def compiled_pair_phase(self) -> str | None:
        """"ready", "compiling", "waiting", "failed" or None: Compare's compiled pair step (speed/pair_graph.py)."""
        return self._compiled_pair.phase

    def set_adapter(self, adapter_dir: str | Path | None) -> None:
        """Attach (or swap, or with None remove) the tuned adapter; the base weights stay loaded."""
        from peft import PeftModel

        with self._lock:
            self._merged.clear()  # merged from the old adapter (and maybe the old fused layout)
            self._packed.clear()
            self._compiled_pair.clear()
            if adapter_dir is None:
                self._put_biases(self._pristine)
                self._tuned_biases = {}
                if isinstance(self.model, PeftModel):  # unload, not delete_adapter: an adapter-less PeftModel
                    self.base = self.model.unload()     # still routes generate() to the deleted adapter
                    self.model = self.base
                self.adapter_dir = None
                self.tokenizer.chat_template = self._default_template
                return
            adapter_dir = Path(adapter_dir)
            if not (adapter_dir / "adapter_config.json").exists():
                raise UserError(f"{adapter_dir} holds no adapter (adapter_config.json is missing).",
                                hint="Pick a finished run or one of its checkpoints.")
            adapter_folder.require_safetensors(adapter_dir)
            self._put_biases(self._pristine)  # the previous adapter's trained biases must not leak into this one
            self._tuned_biases = {}
            self._match_layout(adapter_dir)
            if isinstance(self.model, PeftModel):
                if TUNED in self.model.peft_config:
                    self.model.delete_adapter(TUNED)
                self.model.load_adapter(str(adapter_dir), adapter_name=TUNED, is_trainable=False)
                self.model.set_adapter(TUNED)
            else:
                self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=TUNED,
                                                       is_trainable=False)
            self.model.eval()
            self.adapter_dir = adapter_dir
            self._compiled_pair.source = {"model": self.model_name, "settings": dataclasses.asdict(self.settings),
                                          "adapter": str(adapter_dir)}  # what its compiler process loads
            now = _bias_snapshot(self.model)
            self._tuned_biases = {k: v for k, v in now.items()
                                  if k in self._pristine and not _same(v, self._pristine[k])}
            self.tokenizer.chat_template = adapter_folder.adapter_chat_template(adapter_dir) or self._default_template
            release_thread_pool()

    def _put_biases(self, values: dict[str, Any]) -> None:
        if not values:
            return
        import torch

        params = _bias_params(self.model)
        with torch.no_grad():
            for name, value in values.items():
                if name in params:
                    params[name].copy_(value)

    @contextlib.contextmanager
    def _adapter_off(self) -> Iterator[None]:
        """The untouched base: adapter layers off and the base's own biases back in place."""
        if not self.has_adapter:
            yield
            return
        self._put_biases({k: self._pristine[k] for k in self._tuned_biases})
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self._put_biases(self._tuned_biases)

    def prompt_ids(self, history: Messages) -> list[int]:
        """The token ids a history is answered from (chat template + generation prompt), as generation uses them."""
        return self._inputs([history])["input_ids"][0].tolist()

    def forward_logits(self, input_ids: list[int], adapter: bool) -> Any:
        """Logits [len(input_ids), vocab] (float32, CPU) of one sequence, tuned or exactly the base."""
        import torch

        if adapter and not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        device = next(self.base.parameters()).device
        ids = torch.tensor([input_ids], device=device)
        with self._lock, torch.inference_mode(), cpu_threads(device, steady=True):
            ctx = contextlib.nullcontext() if adapter else self._adapter_off()
            with ctx:
                return self.model(input_ids=ids).logits[0].float().cpu()

    def greedy_ids(self, history: Messages, adapter: bool, max_new_tokens: int) -> list[int]:
        """The greedy answer's token ids (without the stop token): what stream() shows at temperature 0."""
        import torch

        if adapter and not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        inputs = self._inputs([history])
        with self._lock, torch.inference_mode(), cpu_threads(inputs["input_ids"].device):
            ctx = contextlib.nullcontext() if adapter else self._adapter_off()
            with ctx:
                out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                          eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))
        return new[:stop]

    def _match_layout(self, adapter_dir: Path) -> None:
        """Split the base's fused layers the way the adapter was trained (lora.fused_slices), or put them back."""
        from peft import PeftModel

        from phi3_lora import fused

        needed = fused.split_needed(adapter_dir)
        if set(needed) == set(fused.split_groups(self.base)):
            return
        if isinstance(self.model, PeftModel):  # another layout: drop the old adapter's LoRA layers first
            self.base = self.model.unload()
            self.model = self.base
        fused.restore_fused_layers(self.base)
        fused.split_fused_layers(self.base, needed)

    def _inputs(self, histories: list[Messages]) -> dict[str, Any]:
        texts = [self.tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=False)
                 for h in histories]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # generation appends on the right
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = old_side
        device = next(self.base.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def _can_mix(self) -> bool:
        """One batch for both sides works only when the adapter lives in its own layers: DoRA cannot be routed
        per row, and trained biases sit in the base's own tensors, shared by both rows."""
        cfg = getattr(self.model, "peft_config", {}).get(TUNED)
        return cfg is not None and not getattr(cfg, "use_dora", False) and not self._tuned_biases

    def stream_pair(self, base_history: Messages, tuned_history: Messages, settings: GenerationSettings,
                    every: float = 0.0) -> Iterator[tuple[str, str]]:
        """Yield (base_text, tuned_text) as both grow, after every step or, with `every` > 0, at most once per
        `every` seconds (the first step at once; the last yield always the whole answers). Each history ends with
        the new user turn."""
        if not self.has_adapter:
            for text in self.stream(base_history, adapter=False, settings=settings, every=every):
                yield text, ""
            return
        if not self._can_mix():
            base_text = ""
            for base_text in self.stream(base_history, adapter=False, settings=settings, every=every):
                yield base_text, ""
            for tuned_text in self.stream(tuned_history, adapter=True, settings=settings, every=every):
                yield base_text, tuned_text
            return
        for texts in self._generate([base_history, tuned_history], settings, adapter_names=[BASE, TUNED],
                                    every=every):
            yield texts[0], texts[1]

    def stream(self, history: Messages, adapter: bool, settings: GenerationSettings,
               every: float = 0.0) -> Iterator[str]:
        """Yield the growing answer for one history, with the adapter on or off (`every`: as in stream_pair)."""
        if adapter and not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        # One row needs no mixed-adapter batch: peft's per-row adapter routing measured ~1.7x slower per token
        # than the plain adapter (bench/train_speed.py); the base side runs inside disable_adapter().
        for texts in self._generate([history], settings, adapter_names=None, disable=not adapter, every=every):
            yield texts[0]

    def answer(self, history: Messages, adapter: bool, settings: GenerationSettings) -> str:
        text = ""
        for text in self.stream(history, adapter, settings):
            pass
        return text

    @contextlib.contextmanager
    def adapter_state(self, on: bool, merged: bool = False, steady: bool = False) -> Iterator[Any]:
        """The model with the tuned adapter on or off, held by this caller alone (the switch is model-wide).
        `merged`: the tuned side from the adapter's merged weights where possible (`merging.MergedWeights`, made
        once per adapter): same answers, faster per token; not for mixed-adapter batches. `steady`: CPU threads
        that do not follow the load (`threads.cpu_threads`), for scores."""
        import torch

        if on and not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        device = next(self.base.parameters()).device
        with self._lock, torch.inference_mode(), cpu_threads(device, steady):
            with self._side(on, merged):
                yield self.model

    def _side(self, on: bool, merged: bool) -> contextlib.AbstractContextManager:
        if not on:
            return self._adapter_off()
        return self._merged.applied(self.model) if merged else contextlib.nullcontext()

    @staticmethod
    def _merge_for(rows: int, adapter_names: list[str] | None) -> bool:
        return adapter_names is None and merging.MERGE_FOR_SPEED and rows <= merging.MERGE_MAX_ROWS

    def _new_tokens(self, inputs: dict[str, Any], settings: GenerationSettings, stopping_criteria: list[Any] | None,
                    adapter_names: list[str] | None, on_step: Any = None, streamer: Any = None) -> list[list[int]]:
        """Each row's answer ids (without its stop token) from the model in its current state: greedy through
        `decoding.greedy_decode` (finished rows leave the batch), sampling through `generate`, or, for a one-prompt
        pair on the compiled pair step, through `greedy_decode` with generate's own draws (`decoding.Sampler`); on a
        CPU in float32 from oneDNN-packed weights (`cpu_linear`)."""
        with self._packed.applied(self.model):
            return self._decode(inputs, settings, stopping_criteria, adapter_names, on_step, streamer)

    def _decode(self, inputs: dict[str, Any], settings: GenerationSettings, stopping_criteria: list[Any] | None,
                adapter_names: list[str] | None, on_step: Any, streamer: Any) -> list[list[int]]:
        import torch
        from transformers import StoppingCriteriaList

        gen = settings.generate_kwargs()
        greedy = decoding.can_decode(gen)
        # generate would pad with its first eos token where the tokenizer has no pad token; both ways say so here
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        torch.manual_seed(settings.seed)  # before the prompt, as generate's draws expect: both ways draw the same
        if greedy or decoding.can_sample(gen):
            layers = merging.plain_lora_layers(self.model) if adapter_names is not None else []
            routed = bool(layers) and adapter_names == sorted(adapter_names, key=lambda name: name != BASE)
            routing = merging.RowRouting(layers, families.sibling_layers(self.model)) if routed else None
            pair = None
            one_pair = adapter_names is not None and len(adapter_names) == pair_graph.ROWS  # the package's batch
            if routing is not None and one_pair and pair_graph.enabled():  # options.COMPILED_PAIR_CPU, env ..._PAIR
                routing.first_tuned = adapter_names.count(BASE)
                self._compiled_pair.start(self.model, routing, len(adapter_names))
                pair = self._compiled_pair
            sampler = None
            if not greedy and pair is not None:  # sampled: generate's draws, from the compiled step once it is ready
                sampler = decoding.Sampler(self.model, {**gen, "eos_token_id": self.stop_ids, "pad_token_id": pad},
                                           inputs["input_ids"], pad)
            if greedy or sampler is not None:
                with routing.applied() if routing else contextlib.nullcontext():
                    return decoding.greedy_decode(self.model, inputs["input_ids"], inputs["attention_mask"],
                                                  self.stop_ids, settings.max_new_tokens, adapter_names=adapter_names,
                                                  stopping_criteria=stopping_criteria, max_time=settings.max_time,
                                                  on_step=on_step, router=routing, pair=pair, sampler=sampler)
        kwargs = dict(**inputs, **gen, eos_token_id=self.stop_ids, pad_token_id=pad)
        if stopping_criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        if streamer is not None:
            kwargs["streamer"] = streamer
        out = self.model.generate(**kwargs)
        stop = set(self.stop_ids)
        rows = []
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            rows.append(row[:next((i for i, token in enumerate(row) if token in stop), len(row))])
        return rows

    def answer_batch(self, histories: list[Messages], adapter: bool, settings: GenerationSettings,
                     stopping_criteria: list[Any] | None = None, *,
                     adapter_names: list[str] | None = None) -> list[str]:
        """One answer per history from one left-padded batch, adapter on or off, no streaming. With
        `adapter_names` (BASE or TUNED per row) the rows mix base and tuned answers in that one batch."""
        inputs = self._inputs(histories)
        with self.adapter_state(adapter, merged=self._merge_for(len(histories), adapter_names)):
            rows = self._new_tokens(inputs, settings, stopping_criteria, adapter_names)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    def answer_pairs(self, histories: list[Messages], settings: GenerationSettings,
                     stopping_criteria: list[Any] | None = None, *, mix: bool = True) -> list[tuple[str, str]]:
        """(base answer, tuned answer) per history. Where the adapter allows it (`_can_mix`), both sides run as ONE
        left-padded batch of 2 x len(histories) rows routed by adapter_names: one pass over the weights and one
        set of per-token Python work for both models, each row leaving the batch when its answer ends."""
        if not self.has_adapter:
            raise UserError("No adapter is loaded: pick a finished run first.")
        n = len(histories)
        if mix and self._can_mix():
            both = self.answer_batch(histories + histories, True, settings, stopping_criteria,
                                     adapter_names=[BASE] * n + [TUNED] * n)
            return list(zip(both[:n], both[n:]))
        base = self.answer_batch(histories, False, settings, stopping_criteria)
        tuned = self.answer_batch(histories, True, settings, stopping_criteria)
        return list(zip(base, tuned))

    def _generate(self, histories: list[Messages], settings: GenerationSettings,
                  adapter_names: list[str] | None, disable: bool = False, every: float = 0.0) -> Iterator[list[str]]:
        """Each row's growing answer, once per step or, with `every` > 0, at most once per `every` seconds
        (`decoding.PairStreamer.updates`); the last texts yielded are the whole answers."""
        import torch

        inputs = self._inputs(histories)
        streamer = decoding.PairStreamer(self.tokenizer, len(histories), self.stop_ids)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock, torch.inference_mode(), cpu_threads(inputs["input_ids"].device):
                    on = not (disable and adapter_names is None)
                    with self._side(on, on and self._merge_for(len(histories), adapter_names)):
                        self._new_tokens(inputs, settings, None, adapter_names, on_step=streamer.put_tokens,
                                         streamer=streamer)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
            finally:
                streamer.end()

        release_thread_pool()  # this thread's OpenMP pool would slow the worker's down (threads.release_thread_pool)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        shown: list[str] | None = None
        for texts, final in streamer.updates(every):
            if final:
                thread.join()
                if errors:
                    raise errors[0]
                if texts == shown:  # already shown whole
                    return
            shown = texts
            yield texts


def _canonical(name: str) -> str:
    """A parameter's name in the bare base model, whether or not peft wraps it."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _bias_params(model: Any) -> dict[str, Any]:
    return {_canonical(n): p for n, p in model.named_parameters()
            if n.endswith("bias") and ".modules_to_save." not in n and "lora_" not in n}


def _bias_snapshot(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in _bias_params(model).items()}


def _same(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))
