"""The dev hold-out: a seeded draw of a split's queries that fine-tuning never trains on, and
on which the teacher checks itself, fusion chooses its weight and index tuning measures loss."""

from __future__ import annotations

import random
from collections.abc import Iterable


def dev_split(qids: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train qids, dev qids): a seeded random `fraction` of the queries held out as dev."""
    ordered = sorted(qids)
    if not 0 <= fraction < 1:
        raise ValueError(f"dev fraction must be in [0, 1), got {fraction}")
    n_dev = int(round(len(ordered) * fraction))
    dev = set(random.Random(seed).sample(ordered, n_dev)) if n_dev else set()
    return [q for q in ordered if q not in dev], [q for q in ordered if q in dev]
