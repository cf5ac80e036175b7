"""The preference model's loss and batching: soft labels, weights, pairs of one prompt together.

    preference_loss(delta, "soft", soft_label, weight)

* soft   -[p log σ(Δ) + (1-p) log σ(-Δ)]: binary cross-entropy against the soft label, so a 55/45
         judgement asks for a small Δ instead of an unbounded one (human rows: p = 1, plain BT);
* margin -log σ(Δ - m): trl's own margin term, m = the row's `margin` (0 for human rows);
* hard   -log σ(Δ): plain Bradley-Terry on the label's direction.

Each pair's loss is multiplied by its `weight` and the batch loss is the mean of the weighted
losses. `grouped_order` puts the pairs of one prompt into the same batch (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from cai.backends.base import Chat

if TYPE_CHECKING:
    import torch

LabelMode = Literal["soft", "margin", "hard"]


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def preference_loss(
    delta: torch.Tensor,  # (B,) r_chosen - r_rejected
    mode: LabelMode = "soft",
    soft_label: torch.Tensor | None = None,  # (B,) P(chosen better); NaN = hard label (p = 1)
    weight: torch.Tensor | None = None,  # (B,)
    margin: torch.Tensor | None = None,  # (B,)
) -> torch.Tensor:  # () mean of the weighted per-pair losses
    """The PM loss of a batch of pairs; see the module docstring for the three modes."""
    import torch
    import torch.nn.functional as F

    if mode == "soft":
        p = torch.ones_like(delta) if soft_label is None else soft_label.to(delta.dtype).nan_to_num(nan=1.0)
        losses = -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta))
    elif mode == "margin":
        losses = -F.logsigmoid(delta - (margin.to(delta.dtype) if margin is not None else 0.0))
    elif mode == "hard":
        losses = -F.logsigmoid(delta)
    else:
        raise ValueError(f"unknown label mode {mode!r}")
    if weight is not None:
        losses = losses * weight.to(delta.dtype)
    return losses.mean()


# --------------------------------------------------------------------------------------------
# Batches grouped by prompt
# --------------------------------------------------------------------------------------------


def grouped_order(groups: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """Row indices ordered so that consecutive `batch_size` chunks hold whole prompt groups.

    With K responses per prompt there are K(K-1)/2 pairs; scattering them over batches shows
    each response in K-1 separate updates, which overfits (DESIGN.md section 7). Groups larger
    than a batch are cut into batch-sized pieces; pieces are packed best-fit-decreasing, full
    batches are shuffled, and the few batches that could not be filled go last.
    """
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    pieces: list[list[int]] = []
    for rows in members.values():
        rng.shuffle(rows)
        pieces += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(pieces)
    pieces.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order
    full: list[list[int]] = []
    open_by_room: dict[int, list[list[int]]] = {room: [] for room in range(1, batch_size)}
    for piece in pieces:
        room = next((r for r in range(len(piece), batch_size) if open_by_room[r]), None)
        batch = open_by_room[room].pop() if room is not None else []
        batch += piece
        if len(batch) == batch_size:
            full.append(batch)
        else:
            open_by_room[batch_size - len(batch)].append(batch)
    rng.shuffle(full)
    partial = [batch for room in sorted(open_by_room) for batch in open_by_room[room]]
    return [i for batch in full + partial for i in batch]


class PromptGroupSampler:
    """A training sampler yielding `grouped_order`, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int) -> None:
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.groups, self.batch_size, random.Random(f"{self.seed}:{self.epoch}")))

    def __len__(self) -> int:
        return len(self.groups)


def prompt_key(prompt: Chat) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)
