"""A compiled layer's random draws are saved for the backward pass, never drawn again there.

With an activation budget below 1 (`torch._functorch.config.activation_memory_budget`, the memory budget's plans
for compiled layers: issue 19), the min-cut partitioner may recompute in the backward pass nodes it otherwise
bans from recomputation, and random ops are among them: only nodes marked MUST_SAVE are excluded. Inductor
draws a layer's random numbers from `prims.inductor_seeds`, so when that node was recomputed, the backward drew
new seeds and LoRA dropout's mask there was a different mask from the forward's: the LoRA gradients were taken
through other dropped-out values than the output (tests/test_dropout_mask.py shows half the positions differ,
torch 2.13, as the 8 and 24 GiB plans ran; a run still trained, its loss within 1% of the recipe's, which is why
the bench's loss check did not see it).

Marked MUST_SAVE here, the draw itself (a few bytes of seeds) is kept; what derives from it (the uniform values,
the mask: deterministic given the seeds) may still be recomputed, so the budget's memory is what it was, and the
backward's mask is the forward's. Installed by `layers.compile_layers` as Inductor's joint-graph post pass (after
Inductor has turned random ops into seeded ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy


def is_draw(node: torch.fx.Node) -> bool:
    """A node that draws from torch's random generator (its value changes each time it runs). Attention ops are
    tagged as seeded for their dropout: with `dropout_p` 0 they draw nothing, and saving their outputs would
    cost the budget (on a tiny Phi-3 layer, 11% more of what the partitioner keeps at a share of 0.08)."""
    target = node.target
    if not (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags):
        return False
    return _argument(node, "dropout_p", default=None) not in (0, 0.0)


def _argument(node: torch.fx.Node, name: str, default: Any) -> Any:
    for index, argument in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if argument.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if index < len(node.args):
                return node.args[index]
            return argument.default_value if argument.has_default_value() else default
    return default


class SaveDraws(CustomGraphPass):
    """Mark every random draw in a joint forward-backward graph MUST_SAVE (see the module doc)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if is_draw(node):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def install() -> None:
    """Inductor's joint-graph post pass for this process's compiled layers."""
    import torch._inductor.config as inductor_config

    current = inductor_config.joint_custom_post_pass
    if current is not None and not isinstance(current, SaveDraws):
        raise RuntimeError("another joint-graph post pass is installed; phi3_lora's would replace it")
    inductor_config.joint_custom_post_pass = SaveDraws()
