"""Progress of long stages, for whoever is listening.

Stages draw their progress with `progress_bar` (a tqdm bar). When an orchestrator has installed
a listener with `reporting_progress_to` (the Prefect flow does, to publish progress artifacts),
every update is also passed to it as (label, done, total). Without a listener it is plain tqdm,
so library code stays free of any orchestrator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

ProgressListener = Callable[[str, int, int], None]  # (label, done, total)

_listener: ContextVar[ProgressListener | None] = ContextVar("retroflow_progress_listener", default=None)


@contextmanager
def reporting_progress_to(listener: ProgressListener) -> Iterator[None]:
    """Pass every `progress_bar` update made inside the block (same thread/context) to `listener`."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


class _ReportingBar(tqdm):
    # tqdm stops counting when disabled (non-main DDP ranks, show_progress=False), so the
    # count reported is kept here.
    def __init__(self, *args, listener: ProgressListener, **kwargs) -> None:
        self._listener = listener
        self._label = str(kwargs.get("desc") or "progress")
        self._done = int(kwargs.get("initial") or 0)
        self._total = int(kwargs.get("total") or 0)
        super().__init__(*args, **kwargs)
        self._notify()

    def update(self, n: float | None = 1) -> bool | None:
        self._done += int(n or 0)
        shown = super().update(n)
        self._notify()
        return shown

    def _notify(self) -> None:
        if self._total > 0:
            self._listener(self._label, min(self._done, self._total), self._total)


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm bar (same arguments) whose updates also reach the installed listener, if any."""
    listener = _listener.get()
    if listener is None:
        return tqdm(*args, **kwargs)
    return _ReportingBar(*args, listener=listener, **kwargs)
