"""Two identical runs on one store: one builds, the other waits and adopts its artifact; nothing is left behind."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from retroflow.artifacts import ArtifactStore
from retroflow.config import StageConfig


class SlowConfig(StageConfig):
    value: int = 1


def build_once(root: str, log: str) -> str:
    store = ArtifactStore(root)

    def body(out_dir: Path, partial_dir: Path) -> dict:
        with open(log, "a") as handle:
            handle.write("built\n")
        (partial_dir / "checkpoint").write_text("step 1")
        time.sleep(1.0)
        (out_dir / "result.txt").write_text("done")
        return {"ok": 1}

    return str(store.build("slow", SlowConfig(), {}, "code-1", body).path)


def test_two_identical_builds_at_once_build_once_and_share_the_artifact(tmp_path):
    root, log = str(tmp_path / "store"), str(tmp_path / "log.txt")
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        paths = pool.starmap(build_once, [(root, log), (root, log)])
    assert paths[0] == paths[1] and (Path(paths[0]) / "result.txt").read_text() == "done"
    assert Path(log).read_text() == "built\n"  # the second run adopted the first one's artifact
    leftovers = [p.name for p in (tmp_path / "store" / "slow").iterdir() if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []


def test_a_failed_build_leaves_no_temporary_directory_but_keeps_its_checkpoints(tmp_path):
    store = ArtifactStore(tmp_path / "store")

    def failing(out_dir: Path, partial_dir: Path) -> dict:
        (partial_dir / "checkpoint").write_text("step 1")
        (out_dir / "half.txt").write_text("half")
        raise RuntimeError("killed")

    try:
        store.build("slow", SlowConfig(value=2), {}, "code-1", failing)
    except RuntimeError:
        pass
    names = [p.name for p in (tmp_path / "store" / "slow").iterdir()]
    assert not [n for n in names if ".tmp-" in n]
    assert any(n.endswith(".partial") for n in names)
