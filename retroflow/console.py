"""Console conventions shared by every CLI command.

Human-readable output (tables, progress) goes to stderr/stdout first; the **last stdout
line is one JSON object** so scripts can `tail -n1 | jq`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("retroflow")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # bind to the stderr of now: a handler kept from an earlier call may hold a closed stream
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return str(value) if not isinstance(value, (int, float, str, bool, type(None), list, dict)) else value


def emit_json(result: Mapping[str, Any]) -> None:
    sys.stdout.flush()
    print(json.dumps({k: _jsonable(v) for k, v in result.items()}, default=str), flush=True)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Plain fixed-width table (no colour codes, so it survives logs and CI)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
