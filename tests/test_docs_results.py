"""The docs' measured-figure tables are generated from docs/results.yaml and up to date."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "render_results.py"


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_repository_docs_are_up_to_date():
    result = render("--check")
    assert result.returncode == 0, result.stderr


def test_every_figure_has_the_required_fields():
    data = yaml.safe_load((ROOT / "docs" / "results.yaml").read_text(encoding="utf-8"))
    ids = [fig["id"] for fig in data["figures"]]
    assert len(ids) == len(set(ids))
    for fig in data["figures"]:
        for key in ("id", "what", "metric", "value", "command", "commit", "date", "table"):
            assert fig.get(key) not in (None, ""), (fig["id"], key)
        assert fig["table"] in data["tables"]
        if "met" in fig:
            assert "target" in fig, fig["id"]


def test_a_changed_value_makes_check_fail_naming_file_and_table(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(ROOT / "docs" / "results.md", tmp_path / "docs" / "results.md")
    results = tmp_path / "results.yaml"
    shutil.copy(ROOT / "docs" / "results.yaml", results)
    args = ("--root", str(tmp_path), "--results", str(results))
    assert render("--check", *args).returncode == 0

    data = yaml.safe_load(results.read_text(encoding="utf-8"))
    fig = next(f for f in data["figures"] if f["id"] == "quickstart.bm25.ndcg@10")
    fig["value"] = 0.1234
    results.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")

    result = render("--check", *args)
    assert result.returncode == 1
    assert "docs/results.md: table 'quickstart' is out of date" in result.stderr
    # every table showing that figure is named, not only its home table
    assert "docs/results.md: table 'finetune' is out of date" in result.stderr
    assert "0.1234" not in (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")

    # rendering rewrites the blocks; then the check passes and the new value is shown
    assert render(*args).returncode == 0
    assert render("--check", *args).returncode == 0
    assert "| BM25 | 0.1234 |" in (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")


def test_a_deployment_description_shows_its_measured_figure_and_check_fails_when_it_drifts(tmp_path: Path):
    """prefect.yaml's durations come from docs/results.yaml (what the Prefect UI shows cannot drift)."""
    shutil.copy(ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    results = tmp_path / "results.yaml"
    data = yaml.safe_load((ROOT / "docs" / "results.yaml").read_text(encoding="utf-8"))
    fig = next(f for f in data["figures"] if f["id"] == "quickstart-fused.wall")
    fig["value"], fig["commit"] = 421, "abc1234"
    results.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    args = ("--root", str(tmp_path), "--results", str(results))

    result = render("--check", *args)
    assert result.returncode == 1 and "prefect.yaml: description (quickstart-fused.wall) is out of date" in result.stderr
    assert render(*args).returncode == 0 and render("--check", *args).returncode == 0
    deployments = yaml.safe_load((tmp_path / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    quickstart = next(d for d in deployments if d["name"] == "quickstart")
    assert quickstart["description"].endswith("(measured 7 min 1 s at abc1234, 2026-12-04)")


def test_unknown_figure_reference_is_an_error(tmp_path: Path):
    results = tmp_path / "results.yaml"
    data = yaml.safe_load((ROOT / "docs" / "results.yaml").read_text(encoding="utf-8"))
    data["tables"]["quickstart"]["rows"][0][1] = "{no-such-figure}"
    results.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    result = render("--check", "--root", str(ROOT), "--results", str(results))
    assert result.returncode == 2
    assert "no-such-figure" in result.stderr


def test_an_ablation_report_becomes_tables_of_its_figures_and_a_second_copy_replaces_the_first(tmp_path: Path):
    """scripts/ablation_results.py: the study's report JSON -> docs/results.yaml, figures as reported."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import render_results

    row = {"phase": "fine-tuned", "dataset": "scifact", "seeds": 3}
    report = {
        "arms": ["none", "retromae-enhanced"],
        "seeds": [1, 2, 3],
        "baseline": "none",
        "rows": [
            {**row, "arm": "none", "ndcg@10": 0.7081, "ndcg@10 std": 0.0014, "recall@100": 0.95, "recall@100 std": 0.004},
            {**row, "arm": "retromae-enhanced", "ndcg@10": 0.6899, "ndcg@10 std": 0.002, "recall@100": 0.93, "recall@100 std": 0.003},
        ],
        "primary": [
            {
                "comparison": "retromae-enhanced vs none",
                "dataset": "scifact",
                "metric": "ndcg@10",
                "seeds": 3,
                "queries": 300,
                "delta": -0.0182,
                "ci95": [-0.03, -0.006],
                "p": 0.004,
                "p_holm": 0.008,
                "significant": True,
                "smallest_resolvable_effect": 0.012,
            }
        ],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    results = tmp_path / "results.yaml"
    shutil.copy(ROOT / "docs" / "results.yaml", results)
    command = [sys.executable, str(ROOT / "scripts" / "ablation_results.py"), str(tmp_path / "report.json"), "--name", "study-x"]
    command += ["--commit", "abc1234", "--command", "retroflow ablation", "--results", str(results)]
    for _ in range(2):
        assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0
    data = render_results.load(results)
    assert sum(1 for fig in yaml.safe_load(results.read_text())["figures"] if fig["id"].startswith("study-x.")) == 5
    table = render_results.render_table("study-x", data)
    assert "| retromae-enhanced | 0.6899 ± 0.0020 (0.9300 ± 0.0030) |" in table
    primary = render_results.render_table("study-x-primary", data)
    assert "−0.0182" in primary and "Holm-corrected 0.008 (significant" in primary


def ablation_report(arms: list[str], recall: bool = True) -> dict:
    row = {"phase": "fine-tuned", "dataset": "scifact", "seeds": 3}
    rows = [{**row, "arm": arm, "ndcg@10": 0.70 - i / 100, "ndcg@10 std": 0.001} for i, arm in enumerate(arms)]
    if recall:
        rows = [{**r, "recall@100": 0.9, "recall@100 std": 0.01} for r in rows]
    primary = {"dataset": "scifact", "metric": "ndcg@10", "seeds": 3, "queries": 300, "delta": -0.01, "ci95": [-0.02, 0.0]}
    primary |= {"p": 0.04, "p_holm": 0.08, "significant": False, "smallest_resolvable_effect": 0.012}
    return {
        "arms": arms,
        "seeds": [1, 2, 3],
        "baseline": arms[0],
        "rows": rows,
        "primary": [{**primary, "comparison": f"{arms[1]} vs {arms[0]}"}],
    }


def copy_report(tmp_path: Path, report: dict, name: str) -> subprocess.CompletedProcess:
    (tmp_path / "report.json").write_text(json.dumps(report))
    command = [sys.executable, str(ROOT / "scripts" / "ablation_results.py"), str(tmp_path / "report.json"), "--name", name]
    command += ["--commit", "abc1234", "--command", "retroflow ablation", "--results", str(tmp_path / "results.yaml")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_an_ablation_copy_that_would_break_the_results_file_is_refused_and_the_file_kept(tmp_path: Path):
    """A re-copy after an arm was renamed and recall dropped leaves no stale figure; an unfinished
    study, or a name that belongs to a hand-written table, is one line and the file unchanged."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import render_results

    results = tmp_path / "results.yaml"
    shutil.copy(ROOT / "docs" / "results.yaml", results)
    assert copy_report(tmp_path, ablation_report(["none", "mlm", "retromae-basic"]), "study-y").returncode == 0
    assert copy_report(tmp_path, ablation_report(["none", "retromae-enhanced"], recall=False), "study-y").returncode == 0
    data = render_results.load(results)
    assert sorted(fid for fid in data["by_id"] if fid.startswith("study-y.")) == [
        "study-y.none.ft-scifact.ndcg@10",
        "study-y.primary.retromae-enhanced-vs-none.scifact.ndcg@10",
        "study-y.retromae-enhanced.ft-scifact.ndcg@10",
    ]
    assert "| retromae-enhanced | 0.6900 ± 0.0010 |" in render_results.render_table("study-y", data)

    before = results.read_text()
    unfinished = ablation_report(["none", "mlm"])
    unfinished["primary"] = [{"comparison": "mlm vs none", "status": "not run yet"}]
    for report, name, said in [
        (unfinished, "study-z", "'mlm vs none' lacks"),
        (ablation_report(["none", "mlm"]), "quickstart", "not written by"),
    ]:
        result = copy_report(tmp_path, report, name)
        assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert results.read_text() == before
