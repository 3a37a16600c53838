"""The zero-shot fusion weight (retrieval.serving.hybrid): pseudo-queries that behave like queries and the
guarded rule that leaves the dense model alone unless pseudo-queries show a gain beyond their
noise. Synthetic corpora and fake dense encoders: no model, fast."""

from __future__ import annotations

import hashlib
import logging
import random
import re

import numpy as np
import pytest

from retrieval.serving.bm25 import BM25Retriever
from retrieval.serving.hybrid import FusionSettings, HybridSearcher, content_words, guarded_weight, pseudo_queries
from retrieval.serving.search import ExactDenseRetriever

FILLERS = ["river", "apple", "stone", "cloud", "paper", "green", "music", "table", "window", "garden", "silver", "forest"]
TOPIC = re.compile(r"t(\d+)q", re.IGNORECASE)


class TopicEncoder:
    """Sees only the topic number hidden in words like `t12q7`: one-hot over topics (a dense model
    that finds a document's topic from any of its sentences, whatever the words)."""

    def __init__(self, topics: int):
        self.topics = topics

    def _encode(self, texts):
        out = np.zeros((len(texts), self.topics + 1), dtype=np.float32)
        for row, text in enumerate(texts):
            found = [int(t) for t in TOPIC.findall(text)]
            for t in found:
                out[row, t] += 1
            out[row, -1] = 0.0 if found else 1.0
            out[row] /= np.linalg.norm(out[row])
        return out

    encode_queries = encode_passages = _encode


class RandomEncoder:
    """A useless dense model: a fixed random vector per text."""

    def _encode(self, texts):
        return np.stack(
            [np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)).standard_normal(16).astype(np.float32) for t in texts]
        )

    encode_queries = encode_passages = _encode


def sentence(words: list[str]) -> str:
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def bm25_useless_corpus(n: int = 80, seed: int = 0) -> list[str]:
    """Every word that links a sentence to its document is unique (`t{doc}q{k}`): no query shares a
    word with its document's other sentences, only the common filler words, which BM25 matches at random."""
    rng = random.Random(seed)
    counter = iter(range(10**6))
    docs = []
    for i in range(n):
        docs.append(" ".join(sentence([f"t{i}q{next(counter)}" for _ in range(3)] + rng.sample(FILLERS, 4)) for _ in range(4)))
    return docs


def dense_useless_corpus(n: int = 80, seed: int = 0) -> list[str]:
    """Each document's sentences share its own words (`doc{i}word{k}`): BM25 finds the document from any of them."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        vocab = [f"doc{i}word{k}" for k in range(6)]
        docs.append(" ".join(sentence(rng.sample(vocab, 4) + rng.sample(FILLERS, 2)) for _ in range(4)))
    return docs


def searcher(texts: list[str], encoder, **settings) -> HybridSearcher:
    ids = [f"d{i}" for i in range(len(texts))]
    fusion = FusionSettings(pseudo_queries=60, **settings)
    return HybridSearcher(ExactDenseRetriever(encoder, ids, doc_texts=texts), BM25Retriever(ids, texts), fusion, texts)


def test_where_bm25_is_useless_the_rule_keeps_the_dense_model_alone():
    texts = bm25_useless_corpus()
    hybrid = searcher(texts, TopicEncoder(len(texts)))
    selection = hybrid.select_weight(None, None)
    assert selection["chosen_on"] == "pseudo-queries" and selection["weight"] == 1.0
    assert selection["selection_dense_ndcg@10"] > 0.5 > selection["selection_bm25_ndcg@10"]
    assert selection["reason"].startswith("dense alone: no weight beats it") and selection["reason"].endswith("in every style")
    assert selection["pseudo_documents"] == 60 and selection["margin"] == FusionSettings().pseudo_margin


def test_where_the_dense_model_is_useless_the_rule_picks_bm25():
    texts = dense_useless_corpus()
    hybrid = searcher(texts, RandomEncoder())
    selection = hybrid.select_weight(None, None)
    assert selection["weight"] == 0.0, selection["reason"]
    assert selection["selection_bm25_ndcg@10"] > 0.5 > selection["selection_dense_ndcg@10"]
    assert "beats dense alone" in selection["reason"] and selection["gain_lower_bound"]["0.0"] > selection["margin"]
    assert set(selection["by_style"]) == {"keywords", "phrase", "sentence"}
    assert all(style["bm25"] > style["dense"] for style in selection["by_style"].values())


def test_the_query_sentence_leaves_its_document_except_in_the_kept_fraction():
    texts = dense_useless_corpus(200)
    ids = [f"d{i}" for i in range(200)]
    cut = pseudo_queries(ids, texts, count=200, seed=1, styles=("sentence", "keywords", "phrase"), keep_fraction=0.0)
    assert cut.documents == 200 and set(cut.remainders) == set(cut.source.values())
    for qid, query in cut.queries.items():
        doc = cut.source[qid]
        assert cut.qrels[qid] == {doc: 1}
        original = texts[ids.index(doc)]
        if cut.styles[qid] == "sentence":
            assert query in original and query not in cut.remainders[doc]
            assert len(cut.remainders[doc]) < len(original)
        elif cut.styles[qid] == "keywords":
            assert 2 <= len(query.split()) <= 4 and all(w in content_words(original) for w in query.split())
        else:
            assert 4 <= len(query.split()) <= 8 and query in original
    kept = pseudo_queries(ids, texts, count=200, seed=1, keep_fraction=0.1)
    assert 0.03 < 1 - len(kept.remainders) / kept.documents < 0.2  # about 10% keep their sentence
    assert pseudo_queries(ids, texts, count=50, seed=1, keep_fraction=1.0).remainders == {}


def test_the_searched_corpus_has_lost_the_query_sentence_on_both_sides():
    texts = dense_useless_corpus(40)
    hybrid = searcher(texts, TopicEncoder(40), pseudo_styles=["sentence"], pseudo_keep_fraction=0.0)
    pseudo = pseudo_queries(hybrid.doc_ids, texts, count=10, seed=0)
    seen = {}

    class Recorder(BM25Retriever):
        def __init__(self, ids, docs, settings=None):
            seen["texts"] = list(docs)
            super().__init__(ids, docs, settings)

    import retrieval.serving.bm25

    original = retrieval.serving.bm25.BM25Retriever
    retrieval.serving.bm25.BM25Retriever = Recorder
    try:
        hybrid.pseudo_runs(pseudo)
    finally:
        retrieval.serving.bm25.BM25Retriever = original
    for qid, query in pseudo.queries.items():
        doc = pseudo.source[qid]
        assert query not in seen["texts"][hybrid.doc_ids.index(doc)]


def test_guarded_weight_needs_a_gain_beyond_noise_and_margin():
    rng = np.random.default_rng(0)
    grid = [0.0, 0.5, 1.0]
    base = rng.uniform(0.3, 0.7, size=400)
    clusters = [f"d{i // 2}" for i in range(400)]
    noisy = np.stack([base - 0.1, base + rng.normal(0.0, 0.2, size=400), base], axis=1)  # fusion: no real gain, much noise
    assert guarded_weight(noisy, clusters, grid, margin=0.005)["weight"] == 1.0
    clear = np.stack([base - 0.1, base + 0.05, base], axis=1)
    chosen = guarded_weight(clear, clusters, grid, margin=0.005)
    assert chosen["weight"] == 0.5 and chosen["gain_lower_bound"]["0.5"] == pytest.approx(0.05, abs=1e-6)
    assert guarded_weight(clear, clusters, grid, margin=0.06)["weight"] == 1.0  # a gain under the margin is not enough


def test_guarded_weight_fuses_only_when_every_query_style_gains():
    rng = np.random.default_rng(1)
    grid = [0.0, 0.5, 1.0]
    base = rng.uniform(0.3, 0.7, size=600)
    clusters = [f"d{i // 2}" for i in range(600)]
    styles = ["keywords", "sentence"] * 300
    gains = np.where(np.array(styles) == "keywords", 0.1, -0.02)  # keyword queries gain from BM25, sentences lose
    scores = np.stack([base - 0.1, base + gains, base], axis=1)
    assert guarded_weight(scores, clusters, grid, margin=0.005)["weight"] == 0.5  # pooled, fusion looks like a gain
    split = guarded_weight(scores, clusters, grid, margin=0.005, styles=styles)
    assert split["weight"] == 1.0 and split["by_style"]["sentence"]["dense"] > split["by_style"]["sentence"]["bm25"]


def test_too_small_a_corpus_falls_back_to_dense_alone_with_a_logged_reason(caplog):
    texts = dense_useless_corpus(10)
    with caplog.at_level(logging.WARNING, logger="retrieval.serving.hybrid"):
        selection = searcher(texts, RandomEncoder()).select_weight(None, None)
    assert selection["weight"] == 1.0 and selection["chosen_on"].startswith("fallback")
    assert "only 10 documents could give pseudo-queries" in selection["reason"] and selection["reason"] in caplog.text


def test_documents_without_sentences_fall_back_to_dense_alone_with_a_logged_reason(caplog):
    texts = [f"doc{i}word1 doc{i}word2 river apple stone without any full stop" for i in range(100)]
    with caplog.at_level(logging.WARNING, logger="retrieval.serving.hybrid"):
        selection = searcher(texts, RandomEncoder()).select_weight(None, None)
    assert selection["weight"] == 1.0 and selection["pseudo_documents"] == 0
    assert "100 fewer than two sentences" in selection["reason"] and selection["reason"] in caplog.text
