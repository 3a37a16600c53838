"""Run comparison: p-values on constructed cases, regressions, and `retroflow compare` on registered runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eval.compare import compare_registry_runs, compare_runs, find_regressions
from eval.registry import append_run
from flows.cli import main


def per_query(values: list[float], metric: str = "ndcg@10") -> dict[str, dict[str, float]]:
    return {metric: {f"q{i}": v for i, v in enumerate(values)}}


def test_constructed_case_t_test_and_exact_randomisation_by_hand() -> None:
    a = per_query([0.0] * 5)
    b = per_query([0.1, 0.2, 0.3, 0.4, 0.5])
    m = compare_runs(a, b).metrics["ndcg@10"]
    assert m.delta == pytest.approx(0.3) and (m.wins, m.losses, m.ties) == (5, 0, 0)
    # t = mean / (sd / sqrt(n)) with sd = sqrt(0.025): 0.3 / (0.158114 / 2.236068) = 4.242641, 4 degrees of freedom
    t = 0.3 / (math.sqrt(0.025) / math.sqrt(5))
    assert t == pytest.approx(4.242641, rel=1e-6)
    assert m.p_ttest == pytest.approx(2 * stats.t.sf(t, df=4)) and m.p_ttest == pytest.approx(0.01324, abs=1e-5)
    # Of the 2^5 = 32 sign assignments only all-plus and all-minus reach |mean| >= 0.3: p = 2/32.
    assert m.randomization_exact and m.p_randomization == pytest.approx(2 / 32)
    assert 0.1 < m.ci_low < 0.3 < m.ci_high < 0.5


def test_identical_runs_show_no_difference() -> None:
    values = per_query([0.2, 0.5, 0.9, 0.0, 1.0, 0.3])
    m = compare_runs(values, values).metrics["ndcg@10"]
    assert m.delta == 0 and m.p_ttest == 1.0 and m.p_randomization == 1.0 and m.p_bootstrap == 1.0
    assert m.ties == 6 and m.most_changed == []


def test_sampled_randomisation_agrees_with_the_exact_test() -> None:
    rng = np.random.default_rng(1)
    a = per_query(list(rng.random(14)))
    b = per_query(list(np.clip(np.array(list(a["ndcg@10"].values())) + rng.normal(0.08, 0.15, 14), 0, 1)))
    exact = compare_runs(a, b).metrics["ndcg@10"]
    sampled = compare_runs(a, b, exact_max_queries=0, n_resamples=20000, seed=3).metrics["ndcg@10"]
    assert exact.randomization_exact and not sampled.randomization_exact
    assert sampled.p_randomization == pytest.approx(exact.p_randomization, abs=0.01)
    again = compare_runs(a, b, exact_max_queries=0, n_resamples=20000, seed=3).metrics["ndcg@10"]
    assert again.p_randomization == sampled.p_randomization and again.ci_low == sampled.ci_low  # seeded


def test_many_queries_a_consistent_gain_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(300)
    better = compare_runs(per_query(list(base)), per_query(list(base + 0.05 + rng.normal(0, 0.1, 300))), n_resamples=2000)
    noise = compare_runs(per_query(list(base)), per_query(list(base + rng.normal(0, 0.1, 300))), n_resamples=2000)
    gain, null = better.metrics["ndcg@10"], noise.metrics["ndcg@10"]
    assert gain.p_randomization < 0.001 and gain.p_ttest < 0.001 and gain.p_bootstrap < 0.001 and gain.ci_low > 0
    assert null.p_randomization > 0.05 and null.p_ttest > 0.05 and null.ci_low < 0 < null.ci_high


def test_most_changed_queries_and_unpaired_queries() -> None:
    a = {"mrr@10": {"q1": 1.0, "q2": 0.5, "q3": 0.2, "q4": 0.0, "only_a": 1.0}}
    b = {"mrr@10": {"q1": 0.0, "q2": 0.5, "q3": 0.25, "q4": 1.0, "only_b": 0.0}}
    result = compare_runs(a, b, top_n=2)
    m = result.metrics["mrr@10"]
    assert m.num_queries == 4 and result.only_in_a == ["only_a"] and result.only_in_b == ["only_b"]
    assert [(c.qid, c.delta) for c in m.most_changed] == [("q1", -1.0), ("q4", 1.0)]  # ties on |delta| by qid
    assert json.dumps(result.to_dict())  # serialisable for flows and reports


def test_find_regressions_needs_a_real_drop() -> None:
    base = [0.9, 0.8, 0.7, 0.95, 0.85, 0.6, 0.75, 0.9, 0.8, 0.7]
    worse = [v - 0.2 for v in base]
    slightly = [v - 0.01 if i % 2 else v + 0.005 for i, v in enumerate(base)]
    big_drop = compare_runs(per_query(base), per_query(worse))
    assert [m.metric for m in find_regressions(big_drop, threshold=0.05)] == ["ndcg@10"]
    assert find_regressions(big_drop, threshold=0.25) == []  # drop smaller than the threshold
    small = compare_runs(per_query(base), per_query(slightly))
    assert find_regressions(small) == []  # not significant
    assert len(find_regressions(small, alpha=1.0)) == 1  # flag any drop
    assert find_regressions(compare_runs(per_query(worse), per_query(base))) == []  # an improvement


def test_unknown_metric_is_an_error() -> None:
    with pytest.raises(ValueError, match="map@100"):
        compare_runs(per_query([1.0]), per_query([1.0]), metrics=["map@100"])


# --- registry runs and the CLI ------------------------------------------------------------


def register(path: Path, values: dict[str, list[float]], model: str, run_id: str, fingerprint: str = "fp") -> str:
    result = {"per_query": {}, "dataset_fingerprint": fingerprint}
    for dataset, scores in values.items():
        result = {"per_query": per_query(scores), "dataset_fingerprint": fingerprint}
        append_run(path, result, run_id=run_id, config_hash="c", code_version="v", model=model, index=None, dataset=dataset, split="test")
    return run_id


def test_cli_compare_prints_per_dataset_deltas_and_regressions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "registry.parquet"
    base = [0.9, 0.8, 0.7, 0.95, 0.85, 0.6, 0.75, 0.9, 0.8, 0.7, 0.65, 0.5]
    register(path, {"scifact": base, "fiqa": base, "nfcorpus": base}, "minilm", "20250101T000000Z-aaaaaa")
    register(path, {"scifact": [v - 0.2 for v in base], "fiqa": base, "arguana": base}, "retromae", "20250102T000000Z-bbbbbb")
    code = main(["compare", "20250101", "20250102", "--registry", str(path), "--threshold", "0.05"])
    out = capsys.readouterr().out
    assert code == 0
    assert "scifact/test" in out and "fiqa/test" in out and "most changed queries" in out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["run_a"] == "20250101T000000Z-aaaaaa" and line["run_b"] == "20250102T000000Z-bbbbbb"
    deltas = {d["dataset"]: d["metrics"]["ndcg@10"]["delta"] for d in line["datasets"]}
    assert deltas == pytest.approx({"scifact": -0.2, "fiqa": 0.0})
    assert [r["dataset"] for r in line["regressions"]] == ["scifact"]
    assert line["only_in_a"] == ["nfcorpus/test"] and line["only_in_b"] == ["arguana/test"]
    assert main(["compare", "20250101", "20250102", "--registry", str(path), "--fail-on-regression"]) == 1


def test_compare_registry_runs_flags_different_data(tmp_path: Path) -> None:
    path = tmp_path / "registry.parquet"
    register(path, {"scifact": [0.1, 0.2]}, "m", "a", fingerprint="one")
    register(path, {"scifact": [0.1, 0.3]}, "m", "b", fingerprint="two")
    [item], only_a, only_b = compare_registry_runs(path, "a", "b")
    assert not item.same_data and only_a == only_b == []


def test_evaluate_twice_then_compare_end_to_end(scifact_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    registry = str(tmp_path / "registry.parquet")
    common = ["evaluate", "--model", "bm25", "--dataset", str(scifact_small), "--registry", registry]
    assert main(common + ["--set", "bm25.k1=0.9"]) == 0
    run_a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"]
    assert main(common + ["--set", "bm25.k1=0.1", "--set", "bm25.b=0.0"]) == 0
    run_b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"]
    assert main(["runs", "--registry", registry]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [r["run_id"] for r in listed] == [run_a, run_b]
    assert main(["compare", run_a, run_b, "--registry", registry, "--resamples", "2000"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    [dataset] = line["datasets"]
    assert dataset["same_data"] and set(dataset["metrics"]) == {"ndcg@10", "recall@100", "mrr@10", "map@100"}
    ndcg = dataset["metrics"]["ndcg@10"]
    assert ndcg["num_queries"] == 30
    # the reference: scipy's paired t-test on the per-query values the registry kept for both runs
    from scipy import stats

    from eval.registry import run_records

    per_query = {run: run_records(registry, run)[0].per_query["ndcg@10"] for run in (run_a, run_b)}
    common = sorted(per_query[run_a])
    expected = stats.ttest_rel([per_query[run_b][q] for q in common], [per_query[run_a][q] for q in common]).pvalue
    assert ndcg["p_ttest"] == pytest.approx(expected, rel=1e-6)
    assert abs(ndcg["p_randomization"] - expected) < 0.05  # two tests of one hypothesis on 30 queries agree closely
    assert ndcg["mean_b"] - ndcg["mean_a"] == pytest.approx(ndcg["delta"])
