"""Model cards: a README.md beside the weights, in the layout sentence-transformers writes.

    model_card_markdown(card: ModelCard) -> str
    write_model_card(model_dir: Path, card: ModelCard) -> Path

A fine-tuned or pretrained model gets its card when it is saved (base model, data, the stage
config, training figures); the pipeline's exported copy (`runs/<name>/model/`) gets one with the evaluation table
too (the model beside its init, BM25 and the hybrids), so a model handed on explains itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retroflow.publish import atomic_write_text

CARD_FILE = "README.md"
# the fine-tuning metrics a card's "Training Details" lists
# No wall-clock figures: the card is one of the model's files, and the same weights must give the same artifact.
CARD_TRAINING_KEYS = (
    "steps",
    "num_train_queries",
    "num_train_rows",
    "final_loss",
    "temperature",
    "distill",
    "distill_gate",
    "pretrain_gate",
    "pooling_change",
)


@dataclass
class ModelCard:
    name: str
    base_model: str
    datasets: list[str]
    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    dimension: int | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    configs: dict[str, Any] = field(default_factory=dict)  # stage name -> its config
    training: dict[str, Any] = field(default_factory=dict)  # steps, final loss, seconds, gate ...
    evaluation: list[Mapping[str, Any]] = field(default_factory=list)  # report rows
    lineage: list[Mapping[str, Any]] = field(default_factory=list)  # {stage, key, path}
    summary: str | None = None  # the opening paragraph; None = a fine-tuned retriever's
    kind: str = "bi-encoder"  # or "cross-encoder": a reranker scoring (query, passage) pairs


def _front_matter(card: ModelCard) -> str:
    cross = card.kind == "cross-encoder"
    meta = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "text-ranking" if cross else "sentence-similarity",
        "tags": [
            "sentence-transformers",
            "cross-encoder" if cross else "feature-extraction",
            "reranking" if cross else "dense-retrieval",
            "retroflow",
        ],
        "base_model": card.base_model,
        "datasets": card.datasets,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def model_card_markdown(card: ModelCard) -> str:
    details = {
        "Base model": f"`{card.base_model}`",
        "Training data": ", ".join(card.datasets) or "-",
        "Maximum sequence length": card.max_seq_length,
        "Output dimensionality": card.dimension,
        "Pooling": card.pooling,
        "Normalised (cosine similarity)": card.normalize,
        "Query prefix": repr(card.query_prefix) if card.query_prefix else "none",
        "Passage prefix": repr(card.passage_prefix) if card.passage_prefix else "none",
    }
    if card.kind == "cross-encoder":
        details = {
            "Base model": f"`{card.base_model}`",
            "Training data": ", ".join(card.datasets) or "-",
            "Maximum sequence length (query + passage)": card.max_seq_length,
        }
    parts = [
        _front_matter(card),
        f"# {card.name}",
        "",
        card.summary
        or f"A dense retriever fine-tuned from `{card.base_model}` by retroflow. It maps queries and passages to "
        f"{card.dimension}-dimensional vectors; rank passages by {'cosine similarity' if card.normalize else 'inner product'}.",
        "",
        "## Model Details",
        "",
        *(f"- **{k}:** {v}" for k, v in details.items() if v is not None),
        "",
        "## Usage",
        "",
        *_usage(card),
        "",
    ]
    if card.evaluation:
        parts += [
            "## Evaluation",
            "",
            "Every row was computed by the pipeline on the same queries; `Δ init` is against the untouched init model; "
            "`search` says how a row was searched, and a row searched through an approximate index has the exact-search "
            "figures (`exact`) and the index's cost (`Δ index`) beside it.",
            "",
            _table(card.evaluation),
            "",
        ]
    if card.training:
        parts += ["## Training Details", "", *(f"- **{k}:** {v}" for k, v in card.training.items()), ""]
    for stage, config in card.configs.items():
        parts += [f"### `{stage}` config", "", "```yaml", yaml.safe_dump(config, sort_keys=True).rstrip(), "```", ""]
    if card.lineage:
        parts += ["## Lineage", "", _table(card.lineage), ""]
    return "\n".join(parts)


def _usage(card: ModelCard) -> list[str]:
    if card.kind == "cross-encoder":
        return [
            "```python",
            "from sentence_transformers import CrossEncoder",
            "",
            'model = CrossEncoder("path/to/this/directory")',
            'scores = model.predict([("what causes fever?", "Fever is caused by ...")])  # higher = more relevant',
            "```",
            "",
            "In retroflow it is the `teacher` stage's cross-encoder: its scores of each training query's candidates "
            "(`teacher_scores.jsonl`) are what fine-tuning distils.",
        ]
    prompt = ', prompt_name="query"' if card.query_prefix else ""
    return [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/directory")',
        f'queries = model.encode(["what causes fever?"]{prompt})',
        "```",
        "",
        "or with retroflow: `retroflow evaluate --model path/to/this/directory --dataset scifact`.",
    ]


def write_model_card(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / CARD_FILE
    atomic_write_text(path, model_card_markdown(card))
    return path


def card_from_model_dir(model_dir: Path, name: str, base_model: str, datasets: list[str], **extra: Any) -> ModelCard:
    """A card pre-filled with what the model directory itself says (pooling, length, dimension, prompts)."""
    from retroflow.models import read_sentence_transformer_settings

    st = read_sentence_transformer_settings(Path(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelCard(
        name=name,
        base_model=base_model,
        datasets=datasets,
        pooling=st.pooling,
        normalize=st.normalize,
        max_seq_length=st.max_seq_length,
        dimension=config.get("hidden_size"),
        query_prefix=st.query_prefix,
        passage_prefix=st.passage_prefix,
        **extra,
    )
