"""The retrieval interface (retrieval.serving.search.Retriever): every implementation answers
`search({qid: text}, k)` with the same run shape, and each agrees with an independent reference."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest

from retrieval.serving.bm25 import BM25Retriever
from retrieval.serving.encode import write_embeddings
from retrieval.serving.encoder import Encoder, EncoderSettings
from retrieval.serving.hybrid import FusionSettings, HybridSearcher, dense_side
from retrieval.serving.index import IndexConfig, IndexRetriever
from retrieval.serving.index import run as build_index
from retrieval.serving.search import ExactDenseRetriever, MemoryIndexRetriever, Retriever
from retrieval.training.negatives import dense_retriever
from retroflow.data.beir import load_dataset
from retroflow.inputs import path_input

K = 10


@pytest.fixture(scope="module")
def corpus(scifact_small):
    dataset = load_dataset(scifact_small)
    queries = dict(list(dataset.split_queries("test").items())[:8])  # a few real SciFact queries
    return dataset, queries


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder(tiny_bert, EncoderSettings(show_progress=False))


@pytest.fixture(scope="module")
def doc_vectors(corpus, encoder):
    dataset, _ = corpus
    return encoder.encode_passages(dataset.doc_texts())


@pytest.fixture(scope="module")
def flat_index_dir(corpus, doc_vectors, tmp_path_factory):
    dataset, _ = corpus
    root = tmp_path_factory.mktemp("retrievers")
    embeddings = write_embeddings(root / "emb", doc_vectors, dataset.doc_ids())
    build_index(IndexConfig(factory="Flat"), {"embeddings": path_input(embeddings)}, root / "flat", root / "partial")
    return root / "flat"


@pytest.fixture(scope="module")
def retrievers(corpus, encoder, doc_vectors, flat_index_dir) -> dict[str, Retriever]:
    dataset, _ = corpus
    doc_ids, texts = dataset.doc_ids(), dataset.doc_texts()
    bm25 = BM25Retriever(doc_ids, texts)
    exact = ExactDenseRetriever(encoder, doc_ids, doc_vectors)
    return {
        "bm25": bm25,
        "exact": exact,
        "exact-encoding-its-corpus": ExactDenseRetriever(encoder, doc_ids, doc_texts=texts),
        "hnsw": dense_retriever(encoder, doc_ids, doc_vectors, index="hnsw", k=K),
        "faiss-index": IndexRetriever(flat_index_dir, encoder),
        "hybrid": HybridSearcher(exact, bm25, FusionSettings(weight=0.5, depth=20), texts),
        "hybrid-rrf": HybridSearcher(exact, bm25, FusionSettings(method="rrf", depth=20), texts),
    }


def test_every_implementation_is_a_retriever_returning_the_same_run_shape(retrievers, corpus):
    dataset, queries = corpus
    known = set(dataset.doc_ids())
    for name, retriever in retrievers.items():
        assert isinstance(retriever, Retriever), name
        run = retriever.search(queries, K)
        assert list(run) == list(queries), name
        for qid, hits in run.items():
            assert 0 < len(hits) <= K and set(hits) <= known, (name, qid)
            scores = list(hits.values())
            assert all(isinstance(s, float) for s in scores), name
            assert scores == sorted(scores, reverse=True), (name, qid)  # dict order is rank order


def test_k_larger_than_the_corpus_returns_every_document_once(retrievers, corpus):
    dataset, queries = corpus
    few = dict(list(queries.items())[:2])
    for name in ("exact", "faiss-index"):  # not HNSW: its graph search need not reach every node
        run = retrievers[name].search(few, dataset.num_docs + 50)
        assert all(len(hits) == dataset.num_docs for hits in run.values()), name


def test_exact_dense_search_equals_a_brute_force_numpy_reference(retrievers, corpus, encoder, doc_vectors):
    dataset, queries = corpus
    run = retrievers["exact"].search(queries, K)
    reference = encoder.encode_queries(list(queries.values())) @ doc_vectors.T
    position = {d: i for i, d in enumerate(dataset.doc_ids())}
    rankings_compared = 0
    for row, (qid, hits) in zip(reference, run.items()):
        best = np.sort(row)[::-1][:K]
        # the returned scores are the K best inner products, and each belongs to the document it names
        np.testing.assert_allclose(list(hits.values()), best, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([row[position[d]] for d in hits], list(hits.values()), rtol=1e-5, atol=1e-5)
        ranked = [dataset.doc_ids()[j] for j in np.argsort(-row, kind="stable")[:K]]
        gaps = np.diff(best)
        if np.all(np.abs(gaps) > 1e-4):  # no near-tie: the ranking itself must match
            assert list(hits) == ranked, qid
            rankings_compared += 1
    assert rankings_compared >= len(queries) // 2


def test_corpus_encoded_on_first_use_gives_the_same_run(retrievers, corpus):
    _, queries = corpus
    given, encoded = retrievers["exact"].search(queries, K), retrievers["exact-encoding-its-corpus"].search(queries, K)
    assert [list(h) for h in given.values()] == [list(h) for h in encoded.values()]


def test_flat_faiss_index_equals_exact_dense_search(retrievers, corpus):
    _, queries = corpus
    exact, indexed = retrievers["exact"].search(queries, K), retrievers["faiss-index"].search(queries, K)
    assert [list(h) for h in indexed.values()] == [list(h) for h in exact.values()]
    for qid in exact:
        assert list(indexed[qid].values()) == pytest.approx(list(exact[qid].values()), abs=1e-6)


def test_bm25_through_the_interface_equals_the_old_bm25_ranking(retrievers, corpus):
    dataset, queries = corpus
    bm25 = retrievers["bm25"]
    run = bm25.search(queries, K)
    # bm25s directly, as the retriever used to be called: same documents, same order, same scores
    tokens = bm25s.tokenize(list(queries.values()), stopwords="en", stemmer=bm25.stemmer, show_progress=False)
    indices, scores = bm25.model.retrieve(tokens, k=K, show_progress=False)
    for qid, row, row_scores in zip(queries, indices, scores):
        expected = [(dataset.doc_ids()[j], float(s)) for j, s in zip(row, row_scores) if s > 0]
        assert list(run[qid].items()) == expected, qid


def test_hybrid_cuts_the_fusion_to_k_and_fuses_its_two_sides(retrievers, corpus):
    from retrieval.serving.hybrid import fuse_minmax, top_hits

    _, queries = corpus
    hybrid = retrievers["hybrid"]
    run = hybrid.search(queries, 5)
    dense, bm25 = hybrid.side_runs(queries)
    fused = fuse_minmax(dense, bm25, 0.5, 20)
    assert run == {qid: dict(top_hits(fused[qid], 5)) for qid in queries}
    with pytest.raises(TypeError, match="by keyword"):
        hybrid.search(queries, 0.5)  # the old search(queries, weight) is refused, not read as a depth


def test_dense_side_is_exact_search_or_the_index(corpus, encoder, doc_vectors, flat_index_dir):
    dataset, _ = corpus
    assert isinstance(dense_side(encoder, dataset.doc_ids(), doc_vectors=doc_vectors), ExactDenseRetriever)
    assert isinstance(dense_side(encoder, dataset.doc_ids(), index=str(flat_index_dir)), IndexRetriever)
    assert isinstance(dense_retriever(encoder, dataset.doc_ids(), doc_vectors, index="hnsw"), MemoryIndexRetriever)


def test_blockwise_exact_search_equals_exact_search_and_marks_missing_rows(corpus, encoder, doc_vectors):
    from retrieval.serving.search import exact_search, exact_search_blocks

    _, queries = corpus
    query_vectors = encoder.encode_queries(list(queries.values()))
    blocks = (doc_vectors[i : i + 7] for i in range(0, len(doc_vectors), 7))  # blocks smaller than k too
    blocked_scores, blocked = exact_search_blocks(query_vectors, blocks, K)
    scores, direct = exact_search(doc_vectors, query_vectors, K)
    np.testing.assert_allclose(blocked_scores, scores, rtol=1e-5, atol=1e-5)
    assert all(set(b) == set(d) for b, d in zip(blocked, direct))
    _, few = exact_search_blocks(query_vectors, [doc_vectors[:3]], 5)  # a corpus smaller than k
    assert (few[:, 3:] == -1).all() and (few[:, :3] >= 0).all()
