"""Shared fixtures: the real data in ../shared/data, a small SciFact subset, a tiny random BERT.

Tests never touch the network. Everything here is seeded and session-scoped (built once).
"""

from __future__ import annotations

import datetime
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`$RETROFLOW_SHARED_DATA`, else `../shared/data` beside the checkout."""
    return Path(os.environ.get("RETROFLOW_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "scifact" / "corpus.jsonl").is_file():
        pytest.fail(f"real test data not found at {path} (set RETROFLOW_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def scifact_dir(shared_data: Path) -> Path:
    return shared_data / "scifact"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the dataset cache and artifact store of a test run out of the user's home."""
    os.environ["RETROFLOW_CACHE"] = str(tmp_path_factory.mktemp("retroflow-cache"))
    os.environ["RETROFLOW_STORE"] = str(tmp_path_factory.mktemp("retroflow-store"))
    os.environ["RETROFLOW_REGISTRY"] = str(tmp_path_factory.mktemp("retroflow-runs") / "registry.parquet")


def write_beir_subset(src: Path, dest: Path, n_test: int, n_train: int, n_extra_docs: int, seed: int = 0) -> Path:
    """A small, real BEIR dataset: some test/train queries, their relevant docs, plus random others."""
    rng = random.Random(seed)
    qrels = {}
    for split in ("test", "train"):
        lines = (src / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        qrels[split] = [line.split("\t") for line in lines]
    keep_q = {}
    for split, n in (("test", n_test), ("train", n_train)):
        qids = sorted({row[0] for row in qrels[split]})
        keep_q[split] = set(rng.sample(qids, n))
    docs_needed = {row[1] for split in qrels for row in qrels[split] if row[0] in keep_q[split]}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines()]
    others = [d["_id"] for d in corpus if d["_id"] not in docs_needed]
    docs_needed |= set(rng.sample(others, n_extra_docs))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "qrels").mkdir(exist_ok=True)
    with open(dest / "corpus.jsonl", "w") as out:
        for doc in corpus:
            if doc["_id"] in docs_needed:
                out.write(json.dumps(doc) + "\n")
    all_q = set().union(*keep_q.values())
    with open(dest / "queries.jsonl", "w") as out:
        for line in (src / "queries.jsonl").read_text().splitlines():
            if json.loads(line)["_id"] in all_q:
                out.write(line + "\n")
    for split in qrels:
        with open(dest / "qrels" / f"{split}.tsv", "w") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for row in qrels[split]:
                if row[0] in keep_q[split]:
                    out.write("\t".join(row) + "\n")
    return dest


@pytest.fixture(scope="session")
def scifact_small(scifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~30 test + 60 train SciFact queries over ~400 real documents (BEIR layout)."""
    return write_beir_subset(scifact_dir, tmp_path_factory.mktemp("scifact-small"), 30, 60, 300)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres: a stand-in for real embeddings' cluster structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def deterministic_wordpiece_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    """Specials, every character (plain and ##), then the most frequent words, ties broken by spelling.

    tokenizers' WordPiece trainer breaks frequency ties in hash-map order, so its vocabulary (and
    every embedding of a tiny model built on it) changed from run to run.
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    known = set(tokens)
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_bert(
    dest: Path, texts: list[str], vocab_size: int = 2000, hidden: int = 64, layers: int = 2, seed: int = 0, dropout: float = 0.1
) -> Path:
    """A random BertModel + a deterministic WordPiece tokenizer over `texts`, saved in HF format."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(vocab=deterministic_wordpiece_vocab(texts, vocab_size), lowercase=True)
    # transformers 5 ignores `vocab_file` for fast tokenizers: wrap the tokenizer object itself.
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(dest)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        # At BERT's 0.02 every random [CLS] vector is nearly the same (97% of top-100 score gaps
        # under 1e-5), so rankings were float-noise ties; 0.2 spreads the scores apart.
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertForMaskedLM(config).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_bert(scifact_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random BERT (2 layers x 64, MLM head included) with a SciFact WordPiece vocab."""
    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 shared cores: one intra-op thread is both faster and steadier for small training runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage_is_working(store: Path, stage: str) -> bool:
    """A build of `stage` is under way in the store (its staging or `.partial` directory exists)."""
    folder = store / stage
    return folder.is_dir() and any(".tmp-" in p.name or p.name.endswith(".partial") for p in folder.iterdir())


def kill_during(run, store: Path, stage: str, rng: random.Random, timeout: float = 300) -> None:
    """SIGKILL the run's process group (started with start_new_session) at a seeded random moment
    while `stage` is being built."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not stage_is_working(store, stage):
        assert run.poll() is None, f"the run ended before stage {stage} started"
        assert time.monotonic() < deadline, f"stage {stage} never started"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)


# ---------------------------------------------------------------------------------------
# The reliability suite's CI sample (tests/reliability/): every fast case, plus a seeded sample
# of the slow ones. `make reliability` (RETROFLOW_RELIABILITY=full) runs every case. The default
# suite keeps SAMPLE_SIZE slow cases drawn with RETROFLOW_RELIABILITY_SEED (default: today's UTC
# day number, so successive CI runs cover different stages); the header prints the seed.
# (Here, not in tests/reliability/conftest.py: a second `conftest` module would shadow this one
# for the tests that import helpers from it.)
# ---------------------------------------------------------------------------------------

SAMPLE_SIZE = 2  # of the 3 slow kill stages


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
    here = os.path.join(os.path.dirname(__file__), "reliability")
    slow = sorted((i for i in items if i.get_closest_marker("slow") and str(i.path).startswith(here)), key=lambda i: i.nodeid)
    keep = set(random.Random(sample_seed()).sample(slow, min(SAMPLE_SIZE, len(slow))))
    dropped = [i for i in slow if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in set(dropped)]
