"""trl's step metrics kept on the GPU until a log reads them: no host sync inside a training step.

trl 1.16's `SFTTrainer.compute_loss` turns entropy and token accuracy into Python floats (`if num_valid > 0`,
`.item()`) and counts the batch's tokens with `.item()`, between the forward and the backward; transformers'
`_track_num_input_tokens` adds one `.item()` per micro-batch. Each read waits until the GPU has drained its
queue: on the H200 a profiled step showed 14 `cudaStreamSynchronize` and 302 ms of kernels in 354 ms of wall time
(issue 19). `DeferredMetrics` computes the same numbers as 0-d device tensors (a clamped denominator and
`torch.where` instead of the branch), adds token counts up on the device (or on the host, where the count is a
shape), and turns them all into Python numbers in one read when something needs them: `log` (where trl averages
them and Trainer reads `num_input_tokens_seen`; Trainer logs at the end of `train` too) and a checkpoint save
(trainer_state.json).
The logged values are the ones trl and Trainer log (tests/test_deferred_metrics.py).

Only trl's common path is mirrored (no compute_loss_func, no label smoother, no MoE aux loss, no DeepSpeed
sequence parallelism, loss_type nll or dft, no `return_outputs`); anything else is trl's own `compute_loss`.
Our own code because neither library has a switch for it; it mirrors trl 1.16 and transformers 5.17-5.23
(`versions.TESTED`), and the trainer keeps the stock path with any other version.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from phi3_lora.speed import versions

NAME = "deferred_metrics"


def available() -> bool:
    """trl and transformers are the versions this mirror was written against."""
    return versions.tested(NAME)


def host_values(tensors: list[torch.Tensor]) -> list[float | int]:
    """The values of 0-d tensors as Python numbers, with one device read per device (not one per tensor).
    Integer tensors come back as ints; float64 carries every float32/bf16 value and any count below 2**53 exactly."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    out: list[float | int] = [0] * len(tensors)
    for indices in by_device.values():
        values = torch.stack([tensors[i].detach().reshape(()).to(torch.float64) for i in indices]).tolist()
        for i, v in zip(indices, values):
            out[i] = v if tensors[i].is_floating_point() else int(v)
    return out


class DeferredMetrics:
    """A mixin for trl's SFTTrainer (put it before SFTTrainer in the bases). Off unless `deferred_metrics`."""

    deferred_metrics: bool = False
    _pending_input_tokens: int | torch.Tensor = 0  # counted since the last resolve, not yet in state

    def _mirrors_trl(self, return_outputs: bool) -> bool:
        """This step takes trl's common path, the one compute_loss below repeats."""
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (self.deferred_metrics and not return_outputs
                and self.compute_loss_func is None and self.label_smoother is None
                and not self.aux_loss_enabled and self.args.loss_type in ("nll", "dft")
                and not (parallelism is not None and getattr(parallelism, "sp_enabled", False)))

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self._mirrors_trl(return_outputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        args, accelerator, metrics = self.args, self.accelerator, self._metrics
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        # trl 1.16 sft_trainer.py, the branch without compute_loss_func / label smoother / aux loss, line for line.
        outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        if args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (accelerator.num_processes // self.get_tp_size())

        # Entropy and token accuracy as trl computes them, kept on the device: `where` instead of `if num_valid > 0`.
        num_valid = accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        entropy_sum = accelerator.gather_for_metrics(outputs.entropy.detach().sum()).sum()
        num_correct = accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
        any_valid, denominator = num_valid > 0, num_valid.clamp(min=1)
        for key, total in (("entropy", entropy_sum), ("mean_token_accuracy", num_correct)):
            mean = total / denominator
            metrics[mode][key].append(torch.where(any_valid, mean, torch.zeros_like(mean)))

        if mode == "train":
            self._total_train_tokens = self._total_train_tokens + self._batch_tokens(inputs)
        metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _batch_tokens(self, inputs: dict[str, Any]) -> int | torch.Tensor:
        """trl's count of the batch's tokens (num_tokens), without reading the device: padding-free rows are
        counted from their shape on the host."""
        accelerator = self.accelerator
        if "attention_mask" in inputs:
            count: int | torch.Tensor = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
        elif "position_ids" in inputs:
            count = inputs["position_ids"].size(1)
            if accelerator.num_processes > 1:
                local = torch.tensor(count, device=inputs["position_ids"].device)
                count = accelerator.gather_for_metrics(local).sum()
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        return count // self._tp_size if self._tp_size != 1 else count

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """transformers' count of input tokens (include_num_input_tokens_seen), added up without `.item()`."""
        args, accelerator = self.args, self.accelerator
        how = args.include_num_input_tokens_seen
        main_input = getattr(self.model, "main_input_name", "input_ids")
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        if not self.deferred_metrics or how == "no" or main_input not in inputs or (
                how == "non_padding" and "attention_mask" not in inputs and pad_id is None):
            return super()._track_num_input_tokens(inputs)  # counts nothing, or warns and counts every token
        if how == "non_padding":
            tokens: int | torch.Tensor = (inputs["attention_mask"].sum() if "attention_mask" in inputs
                                          else (inputs[main_input] != pad_id).sum())
        else:
            tokens = inputs[main_input].numel()
        if accelerator.num_processes > 1:
            tokens = accelerator.gather(torch.as_tensor(tokens, device=args.device, dtype=torch.int64)).sum()
        self._pending_input_tokens = self._pending_input_tokens + tokens

    def resolve_metrics(self) -> None:
        """Every deferred number to the host in one read: trl's metric lists, its token total, and the input
        tokens counted since the last call into `state.num_input_tokens_seen`."""
        slots = [(values, i) for by_key in self._metrics.values() for values in by_key.values()
                 for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        counters = (self._total_train_tokens, self._pending_input_tokens)
        resolved = iter(host_values([values[i] for values, i in slots]
                                    + [c for c in counters if isinstance(c, torch.Tensor)]))
        for values, i in slots:
            values[i] = next(resolved)
        total, pending = (next(resolved) if isinstance(c, torch.Tensor) else c for c in counters)
        self._total_train_tokens = total
        self.state.num_input_tokens_seen += pending
        self._pending_input_tokens = 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.resolve_metrics()
        super().log(logs, start_time)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.resolve_metrics()  # trainer_state.json holds num_input_tokens_seen: a resume starts from it
        super()._save_checkpoint(model, trial)
