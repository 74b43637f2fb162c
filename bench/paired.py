"""Engine against a peer pack by pack: the step times two rows took for the same packs.

A row's tok/s is its timed steps' tokens over their median time, and which packs a row times depends on how many
warm-up steps it took to settle (bench/timing.py), so two rows on the chat mix can time different packs (a short
pack in one window and not the other moves the ratio by a few percent). Every row trains on the same data in the
same order, and every run keeps each step's time (warm-up and timed), so step i of one row and step i of another
saw the same pack. This module compares them there: for each pack index both rows reached past the compile steps,
the fastest time any run of the row took for it (runs of one row differ by interference, never by work), summed
over the packs both have. The headline is the median of the per-pack ratios, which a pack one side took far longer
for (a compile at a new length, the peer's offload warming up) does not move; the ratio of the summed times, which
counts such packs, is given beside it. Pure functions.
"""

from __future__ import annotations

import statistics
from typing import Any

COMPILE_STEPS = 2  # the first steps compile (Triton, Liger, torch.compile, cuDNN plans): never compared


def pack_times(run: dict[str, Any], skip: int = COMPILE_STEPS) -> dict[int, float]:
    """Step index -> seconds for one run: warm-up steps then timed steps, the first `skip` left out."""
    times = list(run.get("warmup_step_s") or []) + list(run.get("step_s") or [])
    return {i: t for i, t in enumerate(times) if i >= skip}


def pack_tokens(run: dict[str, Any]) -> dict[int, int]:
    """Step index -> tokens for the timed steps (the only ones whose tokens a run records)."""
    first = len(run.get("warmup_step_s") or [])
    return {first + i: n for i, n in enumerate(run.get("tokens_per_step_list") or [])}


def fastest(runs: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, int]]:
    """Per pack index, the fastest time over the runs and the tokens any run recorded for it."""
    times: dict[int, float] = {}
    tokens: dict[int, int] = {}
    for run in runs:
        for i, t in pack_times(run).items():
            times[i] = min(times.get(i, t), t)
        tokens.update(pack_tokens(run))
    return times, tokens


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`ours` against `theirs` over the packs both timed (their seconds over ours: above 1 means ours is faster),
    or None when they share no pack. Packs whose recorded tokens differ (another data order) are left out."""
    a, a_tokens = fastest(ours)
    b, b_tokens = fastest(theirs)
    common = sorted(i for i in set(a) & set(b)
                    if a_tokens.get(i, b_tokens.get(i)) == b_tokens.get(i, a_tokens.get(i)))
    if not common:
        return None
    ours_s, theirs_s = sum(a[i] for i in common), sum(b[i] for i in common)
    per_pack = [b[i] / a[i] for i in common]
    return {"packs": len(common), "first": common[0], "last": common[-1], "summed_ratio": theirs_s / ours_s,
            "pack_ratio_median": statistics.median(per_pack), "pack_ratio_min": min(per_pack),
            "pack_ratio_max": max(per_pack),
            "ours_runs": len(ours), "theirs_runs": len(theirs)}


def peer_pairs(names: list[str], ours: str = "engine ", theirs: str = "unsloth ") -> list[tuple[str, str]]:
    """(our row, their row) for every row name that has a peer row at the same budget and data."""
    have = set(names)
    return [(n, theirs + n[len(ours):]) for n in names if n.startswith(ours) and theirs + n[len(ours):] in have]


def paired_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: each engine row against its Unsloth row, pack by pack (empty when no row has a peer)."""
    ok = [r for r in runs if "error" not in r and r.get("step_s")]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by.setdefault(r["name"], []).append(r)
    lines = []
    for mine, peer in peer_pairs(list(by)):
        c = compare(by[mine], by[peer])
        if c is None:
            lines.append(f"| {mine} | {peer} | no pack in common | | | |")
            continue
        lines.append(f"| {mine} | {peer} | {c['packs']} (steps {c['first'] + 1}-{c['last'] + 1}; runs "
                     f"{c['ours_runs']} / {c['theirs_runs']}) | {c['pack_ratio_min']:.3f}-{c['pack_ratio_max']:.3f}"
                     f" | **{c['pack_ratio_median']:.3f}x** | {c['summed_ratio']:.3f}x |")
    if not lines:
        return ""
    head = ["| row | peer | same packs compared | peer's time / ours per pack (min-max) | median pack | summed time |",
            "| --- | --- | --- | --- | ---: | ---: |"]
    return "\n".join(head + lines)
