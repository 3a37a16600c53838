"""Is run B really better (or worse) than run A? Paired tests over the queries both runs scored.

    compare_runs(a_per_query, b_per_query, *, metrics=None, n_resamples=10000, seed=0,
                 top_n=5, exact_max_queries=16) -> ComparisonResult
    find_regressions(comparison, threshold=0.0, alpha=0.05, test="randomization") -> list[MetricComparison]
    compare_registry_runs(registry, run_a, run_b, **options) -> list[DatasetComparison]

`a_per_query`/`b_per_query` are `{metric: {qid: value}}` (the `per_query` of an evaluation
result or a registry record). Every figure is B relative to A: delta = mean(B - A) over the
queries both runs have, so a negative delta is a regression of B.

Per metric:
- paired t-test (scipy's `ttest_rel`; the standard test in IR, robust at these sample sizes),
- randomisation test: under "A and B are the same system" each query's difference is
  equally likely to have either sign; p = share of sign assignments whose |mean| reaches
  the observed one. Exact (all 2^n assignments) for n <= `exact_max_queries`, otherwise
  `n_resamples` seeded random assignments with the +1 correction, p = (hits+1)/(R+1),
- paired bootstrap: a 95% percentile interval for the mean delta, and a p-value from the
  bootstrap distribution of the mean of the centred differences (shift method),
- wins / losses / ties per query, and the `top_n` queries whose value changed most.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from eval.registry import as_frame, run_records

PerQuery = Mapping[str, Mapping[str, float]]
TESTS = ("ttest", "randomization", "bootstrap")
# Differences smaller than this are ties (metric values are sums of float reciprocals).
TIE_TOLERANCE = 1e-9


@dataclass
class QueryChange:
    qid: str
    a: float
    b: float
    delta: float


@dataclass
class MetricComparison:
    metric: str
    num_queries: int
    mean_a: float
    mean_b: float
    delta: float
    p_ttest: float | None
    p_randomization: float | None
    p_bootstrap: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int  # queries where B > A
    losses: int
    ties: int
    randomization_exact: bool
    most_changed: list[QueryChange] = field(default_factory=list)

    def p_value(self, test: str = "randomization") -> float | None:
        if test not in TESTS:
            raise ValueError(f"unknown test '{test}' (use {', '.join(TESTS)})")
        return getattr(self, f"p_{test}")

    def significant(self, alpha: float = 0.05, test: str = "randomization") -> bool:
        p = self.p_value(test)
        return p is not None and p < alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ComparisonResult:
    metrics: dict[str, MetricComparison]
    only_in_a: list[str]  # query ids without a partner (not part of any test)
    only_in_b: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
        }


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------


def paired_t_p(diffs: np.ndarray) -> float | None:
    if len(diffs) < 2:
        return None
    if np.allclose(diffs, diffs[0], atol=TIE_TOLERANCE, rtol=0):
        # Zero variance: the t statistic is 0/0 (no change) or +-inf (the same change everywhere).
        return 1.0 if abs(diffs[0]) <= TIE_TOLERANCE else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def randomization_p(diffs: np.ndarray, n_resamples: int, rng: np.random.Generator, exact_max: int) -> tuple[float | None, bool]:
    """Two-sided sign-flip test of mean(diffs) = 0: (p, whether it enumerated every assignment)."""
    n = len(diffs)
    if n == 0:
        return None, False
    observed = abs(diffs.mean()) - TIE_TOLERANCE
    if n <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ diffs) / n
        return float(np.mean(means >= observed)), True
    hits = 0
    for start in range(0, n_resamples, 1000):  # chunks keep memory at 1000 x n
        size = min(1000, n_resamples - start)
        signs = rng.choice((-1.0, 1.0), size=(size, n))
        hits += int(np.sum(np.abs(signs @ diffs) / n >= observed))
    return (hits + 1) / (n_resamples + 1), False


def bootstrap(diffs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> tuple[float | None, float | None, float | None]:
    """(p, ci_low, ci_high): shift-method p-value and 95% percentile interval of mean(diffs)."""
    n = len(diffs)
    if n == 0:
        return None, None, None
    observed = diffs.mean()
    centred = diffs - observed
    means, null_means = [], []
    for start in range(0, n_resamples, 1000):
        size = min(1000, n_resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        means.append(diffs[picks].mean(axis=1))
        null_means.append(centred[picks].mean(axis=1))
    means_all, null_all = np.concatenate(means), np.concatenate(null_means)
    hits = int(np.sum(np.abs(null_all) >= abs(observed) - TIE_TOLERANCE))
    low, high = np.percentile(means_all, [2.5, 97.5])
    return (hits + 1) / (n_resamples + 1), float(low), float(high)


def compare_metric(
    metric: str,
    a: Mapping[str, float],
    b: Mapping[str, float],
    qids: Sequence[str],
    n_resamples: int,
    seed: int,
    top_n: int,
    exact_max: int,
) -> MetricComparison:
    a_values = np.array([float(a[q]) for q in qids], dtype=np.float64)
    b_values = np.array([float(b[q]) for q in qids], dtype=np.float64)
    diffs = b_values - a_values
    # One generator per metric, seeded by the metric name too: results do not depend on metric order.
    rng = np.random.default_rng([seed, *metric.encode()])
    p_rand, exact = randomization_p(diffs, n_resamples, rng, exact_max)
    p_boot, low, high = bootstrap(diffs, n_resamples, rng)
    order = sorted(range(len(qids)), key=lambda i: (-abs(diffs[i]), qids[i]))
    changed = [
        QueryChange(qids[i], float(a_values[i]), float(b_values[i]), float(diffs[i]))
        for i in order[:top_n]
        if abs(diffs[i]) > TIE_TOLERANCE
    ]
    return MetricComparison(
        metric=metric,
        num_queries=len(qids),
        mean_a=float(a_values.mean()) if len(qids) else math.nan,
        mean_b=float(b_values.mean()) if len(qids) else math.nan,
        delta=float(diffs.mean()) if len(qids) else math.nan,
        p_ttest=paired_t_p(diffs),
        p_randomization=p_rand,
        p_bootstrap=p_boot,
        ci_low=low,
        ci_high=high,
        wins=int(np.sum(diffs > TIE_TOLERANCE)),
        losses=int(np.sum(diffs < -TIE_TOLERANCE)),
        ties=int(np.sum(np.abs(diffs) <= TIE_TOLERANCE)),
        randomization_exact=exact,
        most_changed=changed,
    )


def compare_runs(
    a_per_query: PerQuery,
    b_per_query: PerQuery,
    *,
    metrics: Sequence[str] | None = None,
    n_resamples: int = 10000,
    seed: int = 0,
    top_n: int = 5,
    exact_max_queries: int = 16,
) -> ComparisonResult:
    """Compare B against A on every metric both have (or `metrics`), over their common queries."""
    names = list(metrics) if metrics else [m for m in a_per_query if m in b_per_query]
    missing = [m for m in names if m not in a_per_query or m not in b_per_query]
    if missing:
        raise ValueError(f"metric(s) {', '.join(missing)} not in both runs (A has {sorted(a_per_query)}, B has {sorted(b_per_query)})")
    results: dict[str, MetricComparison] = {}
    only_a: set[str] = set()
    only_b: set[str] = set()
    for name in names:
        a, b = a_per_query[name], b_per_query[name]
        common = sorted(set(a) & set(b))
        only_a |= set(a) - set(b)
        only_b |= set(b) - set(a)
        results[name] = compare_metric(name, a, b, common, n_resamples, seed, top_n, exact_max_queries)
    return ComparisonResult(results, sorted(only_a), sorted(only_b))


def find_regressions(
    comparison: ComparisonResult, threshold: float = 0.0, alpha: float = 0.05, test: str = "randomization"
) -> list[MetricComparison]:
    """Metrics where B is worse than A by more than `threshold` AND the drop is significant at `alpha`.

    Pass alpha=1.0 to flag every drop beyond the threshold, significant or not.
    """
    return [
        m for m in comparison.metrics.values() if m.num_queries and m.delta < -threshold and (alpha >= 1.0 or m.significant(alpha, test))
    ]


# ---------------------------------------------------------------------------------------
# Registry runs
# ---------------------------------------------------------------------------------------


@dataclass
class DatasetComparison:
    dataset: str
    split: str
    comparison: ComparisonResult
    same_data: bool  # both runs saw the same dataset fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "same_data": self.same_data, **self.comparison.to_dict()}


def compare_registry_runs(registry: Any, run_a: str, run_b: str, **options: Any) -> tuple[list[DatasetComparison], list[str], list[str]]:
    """Compare two registered runs on every (dataset, split) both cover.

    Returns (comparisons, datasets only in A, datasets only in B) ("dataset/split" names).
    """
    frame = as_frame(registry)
    records_a = {(r.dataset, r.split): r for r in run_records(frame, run_a)}
    records_b = {(r.dataset, r.split): r for r in run_records(frame, run_b)}
    comparisons = []
    for key in [k for k in records_a if k in records_b]:
        a, b = records_a[key], records_b[key]
        metrics = [m for m in a.per_query if m in b.per_query]
        result = compare_runs(a.per_query, b.per_query, metrics=metrics, **options)
        comparisons.append(DatasetComparison(key[0], key[1], result, a.dataset_fingerprint == b.dataset_fingerprint))
    only_a = [f"{d}/{s}" for d, s in records_a if (d, s) not in records_b]
    only_b = [f"{d}/{s}" for d, s in records_b if (d, s) not in records_a]
    return comparisons, only_a, only_b
