"""Greedy decoding of a left-padded batch that drops each row from the batch as soon as its answer ends.

`transformers.generate` keeps a finished row in the batch until the longest answer ends: it still costs a
forward row per step (the 2-core CPU's matmuls grow with the rows), and a mixed base + tuned batch keeps paying
peft's per-row adapter routing. In an evaluation batch the tuned answers end after ~12 tokens while the base ones
run all 64, so half the batch rode along for ~50 steps. This loop prunes the finished rows from the next
token, the attention mask, the positions, the adapter names and the KV cache (`Cache.batch_select_indices`),
and otherwise does what `generate` does for greedy search: the same position ids from the left-padded mask,
the same float32 argmax over the last position's logits, the same stop tokens. Sampling, repetition penalties
and beam search stay with `generate`.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Iterator

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch

Tokens = list[list[int]]


def greedy_decode(model: Any, input_ids: Any, attention_mask: Any, stop_ids: list[int], max_new_tokens: int, *,
                  adapter_names: list[str] | None = None, stopping_criteria: list[Any] | None = None,
                  max_time: float | None = None, on_step: Callable[[Tokens], None] | None = None,
                  router: Any = None, pair: Any = None, sampler: "Sampler | None" = None) -> Tokens:
    """The greedy answer's new token ids for every row (without its stop token), rows dropped as they end.

    `adapter_names` (peft's mixed batches): one adapter name per row, pruned with the rows; once every live row
    asks for the same adapter the names are left out where that is the model's active adapter. `stopping_criteria`
    are transformers StoppingCriteria, asked with the live rows' ids each step (a row they flag ends there).
    `max_time` ends all rows after that many seconds, as transformers' MaxTimeCriteria does. `on_step` gets the
    tokens so far of all rows after each step (streaming). `router` (`merging.RowRouting`, installed by the
    caller) replaces peft's routing by adapter_names, which must then list every BASE row before the others.
    `pair` (`speed.pair_graph.CompiledPair`): a one-prompt pair's steps run compiled once it is ready (checked every
    step, so an answer switches over mid-way), to the end of the longer answer: a row that ends stays in the
    compiled batch, frozen (its later tokens ignored), since the package only runs the pair; eagerly, finished
    rows leave the batch. `sampler`: sampled answers, as `generate` samples them (`Sampler`): no row leaves the
    batch, eagerly either, since generate keeps every row and draws for all of them at each step."""
    import torch
    from transformers import DynamicCache

    started = time.monotonic()
    rows = input_ids.shape[0]
    out: Tokens = [[] for _ in range(rows)]
    live = list(range(rows))  # original row of each row still in the batch
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate derives from a left-padded mask
    cache = DynamicCache(config=model.config)
    seq, step_ids, step_pos = input_ids, input_ids, positions
    if router is not None:
        assert adapter_names is not None and adapter_names == sorted(adapter_names, key=lambda n: n != BASE)
        router.first_tuned = adapter_names.count(BASE)
    names = _names_for(model, adapter_names) if router is None else None
    fast = None  # speed.pair_graph.PairState while the compiled pair step decodes
    frozen = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)  # ended, kept in the compiled batch
    for step in range(max_new_tokens):
        if pair is not None and fast is None and step > 0:
            fast = pair.begin(cache, mask, max_new_tokens - step)
        logits = None
        if fast is not None:
            try:
                logits = fast.step(step_ids, step_pos, mask)
            except Exception as exc:  # noqa: BLE001 - never a wrong answer: this and later steps run eagerly
                fast.to_dynamic_cache(cache)
                pair.fail(exc)
                fast = pair = None
        if logits is None:
            extra = {"adapter_names": names} if names is not None else {}
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1, **extra).logits[:, -1, :].float()
        nxt = logits.argmax(-1) if sampler is None else sampler(seq, logits, frozen)
        seq = torch.cat([seq, nxt[:, None]], dim=-1)
        ended = torch.isin(nxt, stop)
        for criterion in stopping_criteria or ():
            ended |= criterion(seq, logits).to(ended.device)
        if max_time is not None and time.monotonic() - started > max_time:
            ended[:] = True
        for row, token, done, gone in zip(live, nxt.tolist(), ended.tolist(), frozen.tolist()):
            if not gone and not (done and token in stop_ids):  # a stop token ends the answer, not part of it
                out[row].append(token)
        if on_step is not None:
            on_step(out)
        ended |= frozen
        if bool(ended.all()):
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        step_pos = step_pos[:, -1:] + 1
        if fast is not None or sampler is not None:  # the package runs the pair only (and generate keeps every
            frozen = ended                             # row): an ended row rides along, its output frozen
        elif bool(ended.any()):  # drop the finished rows from everything the next step reads
            pair = None  # (a compiled step that failed mid-answer left its frozen rows here too)
            keep = (~ended).nonzero().squeeze(-1)
            frozen = frozen[keep]
            cache.batch_select_indices(keep)
            kept = keep.tolist()
            live = [live[i] for i in kept]
            mask, step_pos, seq, nxt = mask[keep], step_pos[keep], seq[keep], nxt[keep]
            if adapter_names is not None:
                adapter_names = [adapter_names[i] for i in kept]
                if router is None:
                    names = _names_for(model, adapter_names)
                else:
                    router.first_tuned = adapter_names.count(BASE)
        step_ids = nxt[:, None]
    return out


def _names_for(model: Any, adapter_names: list[str] | None) -> list[str] | None:
    """The adapter names to pass: none where every row asks for the model's one active adapter (peft's plain
    forward: the same sums as its mixed-batch routing, without the per-row indexing)."""
    if adapter_names is None:
        return None
    uniform = set(adapter_names)
    try:
        active = list(model.active_adapters)
    except (AttributeError, TypeError, ValueError):  # not a PeftModel: keep the names, peft's hooks decide
        return adapter_names
    if len(uniform) == 1 and uniform != {BASE} and list(uniform) == active:
        return None
    return adapter_names


class Sampler:
    """`generate`'s multinomial sampling (transformers' _sample) for `greedy_decode`: the logits processors generate
    builds for these generate kwargs (temperature, the model's top-k, top-p), softmax, one multinomial draw for every
    row of the batch at each step, a finished row's token replaced by the pad token. With the same logits and the
    same seed (torch.manual_seed before the prompt) that is generate's answer token for token."""

    def __init__(self, model: Any, gen_kwargs: dict[str, Any], input_ids: Any, pad_token_id: int) -> None:
        from transformers import LogitsProcessorList

        config, model_kwargs = model._prepare_generation_config(None, **gen_kwargs)
        self.processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
            logits_processor=LogitsProcessorList(), device=input_ids.device, model_kwargs=model_kwargs)
        self.pad = pad_token_id

    def __call__(self, seq: Any, logits: Any, finished: Any) -> Any:
        import torch

        probs = torch.nn.functional.softmax(self.processors(seq, logits), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1).masked_fill(finished, self.pad)


def can_sample(settings_kwargs: dict[str, Any]) -> bool:
    """Whether `greedy_decode` with a `Sampler` samples as `generate` would with these kwargs: no penalty."""
    return bool(settings_kwargs.get("do_sample")) and settings_kwargs.get("repetition_penalty", 1.0) == 1.0


def can_decode(settings_kwargs: dict[str, Any]) -> bool:
    """Whether `greedy_decode` gives what `generate` would with these generate kwargs: greedy, no penalty."""
    return not settings_kwargs.get("do_sample") and settings_kwargs.get("repetition_penalty", 1.0) == 1.0


class PairStreamer:
    """A transformers streamer for a batch: queues each row's new token ids (without its stop token) after every
    step; `updates` turns the queue into the texts a reader is shown."""

    def __init__(self, tokenizer: Any, rows: int, stop_ids: list[int]) -> None:
        self.tokenizer, self.rows, self.stop_ids = tokenizer, rows, set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(self.rows, -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
        self.put_tokens(self.tokens)

    def put_tokens(self, rows: Tokens) -> None:
        """Every row's answer ids so far (copied: the decoder goes on appending to its lists)."""
        self.queue.put([list(row) for row in rows])

    def end(self) -> None:
        self.queue.put(None)

    def texts(self, rows: Tokens) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    def updates(self, every: float = 0.0) -> Iterator[tuple[list[str], bool]]:
        """(texts, final) until the decoder ends: each step's texts, or with `every` > 0 at most one update per
        `every` seconds, the latest step's (the first step's at once, so the answer starts showing as it starts),
        each decoded only when it is shown. The last one (final=True) always carries the whole answers, and comes
        once the decoder has ended. A reader that pays per update (the app: the whole chats diffed, serialised and
        sent to the browser, in threads that take the GIL and a core from the decoder) pays it ~1/`every` times a
        second instead of once per token."""
        latest: Tokens | None = None  # not yet shown
        shown_at: float | None = None
        texts = [""] * self.rows
        while True:
            wait = None if latest is None or shown_at is None else max(0.0, shown_at + every - time.monotonic())
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:  # `every` has passed since the last update: show the latest step
                shown_at = time.monotonic()
                texts, latest = self.texts(latest), None
                yield texts, False
                continue
            if item is None:
                break
            latest = item
            if shown_at is None or time.monotonic() - shown_at >= every:
                shown_at = time.monotonic()
                texts, latest = self.texts(item), None
                yield texts, False
        yield (self.texts(latest) if latest is not None else texts), True
