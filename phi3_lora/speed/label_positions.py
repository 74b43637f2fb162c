"""The loss head's labelled positions found on the host, where the labels are made: no wait for the GPU.

trl 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores only the positions whose next-token label
is not -100. On a GPU it picks them with boolean indexing (`hidden_states[mask]`, `labels[mask]`): each is a
`nonzero` whose size the host must read, so every step waits for the GPU twice there (issue 19's sixth session
profiled five such waits per engine step and none in Unsloth's). The labels are on the CPU in the data collator,
so this module

- wraps the collator to add the flat indices of the labelled positions (`KEY`, int64, copied with the batch), and
- wraps the model's fused forward so that, given those indices, it scores them with `index_select` and puts the
  per-token results back with `index_copy` (sizes known on the host: no wait), the rest being trl's own code path:
  the same kernel (`trl.kernels.ChunkedLogProbFunction`), the same loss and outputs.

Anything the copy does not mirror (pre-shifted labels, logit scaling or soft-capping, MoE router losses, sharded
heads) takes trl's forward unchanged. Our own code because trl has no switch for it; it mirrors trl 1.16
(`versions.TESTED`), and the trainer keeps trl's path with any other version.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from phi3_lora.speed import versions

NAME = "label_positions"
KEY = "phi3_label_positions"  # the batch key; it reaches the model as a keyword its wrapped forward takes
_MARK = "_phi3_label_positions"
# Config fields that change trl's fused head (scaling, soft-capping, routers): with any set, trl's own forward.
_UNMIRRORED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
               "output_router_logits")


def available() -> bool:
    """trl is the version this mirror was written against."""
    return versions.tested(NAME)


def positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices, over (batch, length - 1), of the positions whose next-token label is not -100 (pure)."""
    return (labels[:, 1:] != -100).reshape(-1).nonzero().reshape(-1)


class WithLabelPositions:
    """A data collator that adds the labelled positions of each batch it makes (on the host, before the copy)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: Any) -> Any:
        batch = self.collator(features)
        if isinstance(batch, dict) and isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() == 2:
            batch[KEY] = positions(batch["labels"])
        return batch

    def __getattr__(self, name: str) -> Any:  # the trainer reads the wrapped collator's settings
        return getattr(self.__dict__["collator"], name)


def mirrorable(model: Any) -> bool:
    """A causal LM whose fused head this module reproduces: trl's fused forward, an unscaled head."""
    config = model.config.get_text_config()
    return all(not getattr(config, field, None) for field in _UNMIRRORED)


def install(trainer: Any) -> bool:
    """Wrap the trainer's collator and its model's fused forward (idempotent); False where trl's path stays."""
    from peft import PeftModel

    if not available():
        return False
    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    takes = getattr(getattr(model.forward, "__code__", None), "co_varnames", ())
    if not mirrorable(model) or "fused_lm_head" not in takes:  # trl's fused forward, else trl's path stays
        return False
    if not isinstance(trainer.data_collator, WithLabelPositions):
        trainer.data_collator = WithLabelPositions(trainer.data_collator)
    if not getattr(model.forward, _MARK, False):
        fused = model.forward  # trl's, bound to the model

        def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None,
                    num_items_in_batch: Any = None, **kwargs: Any) -> Any:
            index = kwargs.pop(KEY, None)
            if not fused_lm_head or index is None or labels is None or kwargs.get("shift_labels") is not None:
                return fused(*args, fused_lm_head=fused_lm_head, labels=labels,
                             num_items_in_batch=num_items_in_batch, **kwargs)
            return _fused_at(self, index, labels, num_items_in_batch, *args, **kwargs)

        forward.__dict__[_MARK] = True
        model.forward = types.MethodType(forward, model)
    return True


def _fused_at(model: Any, index: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any, *args: Any,
              **kwargs: Any) -> Any:
    """trl 1.16's fused forward (its Triton-device branch), with the labelled positions given as indices."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    kwargs["use_cache"] = False
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    hidden = model.base_model(*args, **kwargs).last_hidden_state.to(device)  # (B, T, H), every position
    labels, index = labels.to(device), index.to(device)
    mask = labels[:, 1:] != -100
    # `index` counts over (B, T - 1), the shifted layout; row b's position t is b * T + t in the unshifted one, so
    # the hidden states are picked from a view (no copy of a sliced batch) and their targets one position later
    full = index + torch.div(index, labels.size(1) - 1, rounding_mode="floor")
    per_token = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.size(-1)).index_select(0, full), lm_head.weight, lm_head.bias,
        labels.reshape(-1).index_select(0, full + 1), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
        ("log_probs", "entropy", "is_top1"))
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.numel()).index_copy(0, index, x).view(mask.shape) for x in per_token)
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=None)
