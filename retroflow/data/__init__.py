"""The `data` stage and the dataset readers every stage uses: BEIR (`beir`), MS MARCO
(`msmarco`) and Natural Questions in DPR format (`nq`), each normalised once to Parquet; and
the dev hold-out of a split's queries (`splits`)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retroflow.config import StageConfig

NORMALISED_FILES = ("corpus.parquet", "queries.parquet", "qrels.parquet", "dataset.json")


class DataConfig(StageConfig):
    """A dataset to normalise: where it is (not part of the key) and what it holds (the key)."""

    source: str
    content_fingerprint: str  # new content, new artifact; the same content under another name, the same one


def data_config(source: str) -> DataConfig:
    """The `data` config of the dataset at `source`: its content fingerprint, normalising it (once,
    into the cache) when its files are new or changed, else from the cache's index alone."""
    from retroflow.data.beir import content_fingerprint

    return DataConfig(source=str(source), content_fingerprint=content_fingerprint(source))


def run(config: DataConfig, inputs: Mapping[str, Any], out_dir: Path, partial_dir: Path) -> dict[str, Any]:
    """The `data` stage: the normalised Parquet files of `config.source`, checked against the key's content."""
    from retroflow.data.beir import DatasetError, load_dataset

    dataset = load_dataset(config.source)
    if dataset.fingerprint != config.content_fingerprint:
        raise DatasetError(
            f"{config.source}: its content changed while the pipeline ran (fingerprint {dataset.fingerprint}, "
            f"expected {config.content_fingerprint})"
        )
    for name in NORMALISED_FILES:
        shutil.copy2(dataset.path / name, Path(out_dir) / name)
    return {"num_docs": dataset.num_docs, "splits": {s: len(q) for s, q in dataset.qrels.items()}, "name": dataset.name}


def open_dataset(data) -> Any:
    """The dataset inside a `data` input: a `data` artifact, or `dataset_input` below
    (the same normalised files in the cache)."""
    from retroflow.data.beir import read_normalised
    from retroflow.inputs import ExternalInput

    # an outside dataset keeps the name it was given now: the cache is shared by content, so its
    # dataset.json names whichever copy was normalised first
    return read_normalised(data.path, data.name if isinstance(data, ExternalInput) else None)


def dataset_input(source: Any):  # -> retroflow.inputs.ExternalInput (imported on use: not a dependency of the data stage)
    """The `data` input for a dataset outside the store: a name, a BEIR directory, or a dataset
    already loaded (`retroflow.data.beir.load_dataset`), normalised once into the cache. What
    `--output` runs and tests hand a stage instead of a `data` artifact; both hold the same files."""
    from retroflow.data.beir import load_dataset
    from retroflow.inputs import ExternalInput

    dataset = source if hasattr(source, "fingerprint") and hasattr(source, "path") else load_dataset(str(source))
    return ExternalInput(name=dataset.name, path=Path(dataset.path), fingerprint=dataset.fingerprint)
