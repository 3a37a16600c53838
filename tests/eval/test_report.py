"""Run reports: the loss plot a report embeds is never seen half-written."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import pytest

from eval.report import embedded_png, plot_loss_curves


def test_a_loss_plot_rewritten_while_it_is_read_is_the_old_one_or_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs of one pipeline share its run folder: one embeds `loss.png` while the other
    rewrites it. A write that dies half-way leaves the previous plot whole and no stray file."""
    path = tmp_path / "runs" / "quickstart" / "loss.png"
    assert plot_loss_curves({"finetune": [3.0, 2.0, 1.5]}, path) == path
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG") and "data:image/png;base64," in embedded_png("loss", path)

    def half_then_crash(self, target, **kwargs):
        Path(target).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        plot_loss_curves({"finetune": [3.0, 1.0]}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]
