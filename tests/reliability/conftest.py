"""The reliability suite's CI sample: every fast case, plus a seeded sample of the slow ones.

`make reliability` (RETROFLOW_RELIABILITY=full) runs every case. The default suite keeps
SAMPLE_SIZE slow cases drawn with RETROFLOW_RELIABILITY_SEED (default: today's UTC day number,
so successive CI runs cover different stages); the header prints the seed to reproduce a draw.
"""

from __future__ import annotations

import datetime
import os
import random

import pytest

SAMPLE_SIZE = 2


def sample_seed() -> int:
    return int(os.environ.get("RETROFLOW_RELIABILITY_SEED") or datetime.datetime.now(datetime.UTC).date().toordinal())


def full_run() -> bool:
    return os.environ.get("RETROFLOW_RELIABILITY") == "full"


def pytest_report_header(config) -> str:
    if full_run():
        return "reliability: every case (RETROFLOW_RELIABILITY=full)"
    return f"reliability: {SAMPLE_SIZE} slow cases sampled with RETROFLOW_RELIABILITY_SEED={sample_seed()}"


def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    if full_run():
        return
    here = os.path.dirname(__file__)
    slow = sorted((i for i in items if i.get_closest_marker("slow") and str(i.path).startswith(here)), key=lambda i: i.nodeid)
    keep = set(random.Random(sample_seed()).sample(slow, min(SAMPLE_SIZE, len(slow))))
    dropped = [i for i in slow if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in set(dropped)]
