"""The pipeline chain without Prefect, its regression check, and the deployment files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retroflow.pipeline import PipelineConfig, load_pipeline_config, regressions
from retroflow.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_pipeline_config_validates():
    for path in sorted((REPO / "configs" / "pipeline").glob("*.yaml")):
        config = load_pipeline_config(path)
        assert config.name == path.stem


def test_pipeline_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nstages: {pretrain: maybe}\nevaluat: {}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(bad)
    assert "stages.pretrain" in str(info.value) and "evaluat" in str(info.value)


class Record:
    def __init__(self, per_query, run_id="old"):
        self.per_query, self.run_id = per_query, run_id


def test_regression_check_flags_only_significant_drops_beyond_threshold():
    pipeline = PipelineConfig(name="t", regression_threshold=0.01)
    before = {"ndcg@10": {f"q{i}": 0.8 for i in range(40)}}
    worse = {"ndcg@10": {f"q{i}": 0.5 for i in range(40)}}
    noisy = {"ndcg@10": {f"q{i}": 0.8 + (0.05 if i % 2 else -0.05) for i in range(40)}}
    assert regressions(pipeline, {"d": {"per_query": worse}}, {"d": Record(before)})
    assert not regressions(pipeline, {"d": {"per_query": noisy}}, {"d": Record(before)})
    assert not regressions(pipeline, {"d": {"per_query": before}}, {"d": None})


def test_prefect_yaml_deployments_point_at_real_flows_and_configs():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"quickstart", "paper", "nightly"} <= names
    for deployment in spec["deployments"]:
        module, func = deployment["entrypoint"].split(":")
        assert (REPO / module).is_file()
        assert f"def {func}(" in (REPO / module).read_text()
        config = deployment.get("parameters", {}).get("config")
        if config:
            load_pipeline_config(REPO / config)
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"


def test_docker_files_parse_and_copy_existing_paths():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert {"postgres", "server", "gpu-worker"} <= set(compose["services"])
    assert "postgresql+asyncpg" in compose["services"]["server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for line in (REPO / "docker" / "Dockerfile.gpu").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_without_prefect(scifact_small, tmp_path, monkeypatch):
    from retroflow.pipeline import read_evaluation, run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    config = load_pipeline_config(REPO / "configs" / "pipeline" / "tiny.yaml")
    result = run_pipeline(config)
    assert result.model.stage == "finetune"
    stages = [a.stage for a in result.artifacts.values()]
    assert stages[:2] == ["data", "pretrain"] and {"negatives", "teacher", "evaluate"} <= set(stages)
    finetuned = result.artifacts["finetune"].manifest
    assert finetuned["inputs"]["teacher"]["stage"] == "teacher"
    assert finetuned["metrics"]["distill_loss_history"], "the student was distilled from the teacher's scores"
    evaluation = read_evaluation(result.evaluations["scifact"])
    assert evaluation["num_queries"] == 30 and 0 <= evaluation["ndcg@10"] <= 1
    lineage_inputs = result.evaluations["scifact"].manifest["inputs"]
    assert lineage_inputs["model"]["stage"] == "finetune"
