"""The pipeline chain without Prefect, its regression check, and the deployment files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.chain import PipelineConfig, load_pipeline_config, regressions
from retroflow.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


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


def test_a_typo_in_a_late_stage_section_is_reported_at_load(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nfinetune: {train: {lr: 2.0e-5, batchsize: 32}}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(bad)
    message = str(info.value)
    assert str(bad) in message and "section 'finetune'" in message and "train.batchsize" in message


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
    from flows.ablation import load_ablation_config

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {(d["entrypoint"].split(":")[1], d["name"]) for d in spec["deployments"]}
    assert {
        ("pretrain_to_beir", "quickstart"),
        ("pretrain_to_beir", "paper"),
        ("reevaluate", "nightly"),
        ("retromae_ablation", "miniature"),
        ("retromae_ablation", "paper"),
    } <= names
    loaders = {"pretrain_to_beir": load_pipeline_config, "retromae_ablation": load_ablation_config}
    for deployment in spec["deployments"]:
        module, func = deployment["entrypoint"].split(":")
        assert (REPO / module).is_file()
        assert f"def {func}(" in (REPO / module).read_text()
        config = deployment.get("parameters", {}).get("config")
        if config:
            loaders[func](REPO / config)
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
    from flows.chain import read_evaluation, run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    config = load_pipeline_config(REPO / "configs" / "pipeline" / "tiny.yaml")
    result = run_pipeline(config)
    assert result.model.stage == "finetune"
    stages = [a.stage for a in result.artifacts.values()]
    assert stages[:3] == ["data", "tokenizer", "pretrain"] and {"negatives", "teacher", "evaluate"} <= set(stages)
    finetuned = result.artifacts["finetune"].manifest
    assert finetuned["inputs"]["teacher"]["stage"] == "teacher"
    assert finetuned["metrics"]["distill_loss_history"], "the student was distilled from the teacher's scores"
    evaluation = read_evaluation(result.evaluations["scifact"])
    assert evaluation["num_queries"] == 30 and evaluation["system"] == "dense"
    lineage_inputs = result.evaluations["scifact"].manifest["inputs"]
    assert lineage_inputs["model"]["stage"] == "finetune"

    # beside the model: its hybrid, the init model (over the encoding the fusion teacher used), hybrid(init), BM25
    refs = result.references["scifact"]
    assert set(refs) == {"hybrid", "init", "hybrid(init)", "bm25"}
    results = {name: read_evaluation(art) for name, art in refs.items()}
    assert results["init"]["model"] == "minilm" and results["bm25"]["model"] == "bm25"
    assert results["hybrid"]["fusion"]["chosen_on"] == "dev"
    assert refs["init"].manifest["inputs"]["embeddings"]["key"] == result.artifacts["teacher"].manifest["inputs"]["embeddings"]["key"]
    from eval.report import metric_rows

    rows = metric_rows({"scifact": evaluation}, references={"scifact": results})
    assert [r["system"] for r in rows] == ["model", "hybrid", "init", "hybrid(init)", "bm25"]
    assert rows[0]["ndcg@10 Δ init"] == pytest.approx(evaluation["ndcg@10"] - results["init"]["ndcg@10"], abs=1e-4)
    assert rows[2]["ndcg@10 Δ init"] == 0.0

    # a second run is all cache hits: the references are computed once per dataset
    again = run_pipeline(config)
    assert {n: a.key for n, a in again.references["scifact"].items()} == {n: a.key for n, a in refs.items()}


def test_a_teacher_model_is_the_teachers_dense_side_and_not_the_init_row(scifact_small, tiny_bert, tmp_path, monkeypatch):
    """`teacher_model` sets the fusion teacher's dense model; the init reference still encodes the
    pipeline's own model (the two encodings are kept apart, not shared by label)."""
    from conftest import build_tiny_bert

    from flows.chain import run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    texts = [json.loads(line)["text"] for line in (scifact_small / "corpus.jsonl").read_text().splitlines()]
    teacher_model = build_tiny_bert(tmp_path / "teacher-model", texts, seed=1)
    overrides = [
        f"model={tiny_bert}",
        f"teacher_model={teacher_model}",
        "stages.pretrain=false",
        "stages.index=false",
        "references.hybrid=false",
        "references.bm25=false",
        "finetune.train.max_steps=1",
    ]
    config = load_pipeline_config(REPO / "configs" / "pipeline" / "tiny.yaml", overrides)
    result = run_pipeline(config)
    teacher = result.artifacts["teacher"].manifest["inputs"]
    init_row = result.references["scifact"]["init"].manifest["inputs"]
    assert Path(teacher["init"]["path"]) == teacher_model.resolve()
    encodings = {a.key: a for name, a in result.artifacts.items() if name.startswith("encode:")}

    def encoded_by(embeddings: dict) -> Path:
        return Path(encodings[embeddings["key"]].manifest["inputs"]["model"]["path"])

    assert encoded_by(teacher["embeddings"]) == teacher_model.resolve()
    assert encoded_by(init_row["embeddings"]) == Path(tiny_bert).resolve()  # not the teacher model's vectors


def test_pipeline_cli_exports_the_model_with_a_card_holding_the_table(scifact_small, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("RETROFLOW_REGISTRY", str(tmp_path / "registry.parquet"))  # the run records its evaluations
    # no pretraining: minilm is fine-tuned for 2 steps; no index: exact search
    overrides = [
        "--set",
        "stages.pretrain=false",
        "--set",
        "stages.teacher=false",
        "--set",
        "finetune.distill.loss=none",
        "--set",
        "stages.index=false",
        "--set",
        "references.init=false",
        "--set",
        "references.hybrid=false",
        "--set",
        "finetune.train.max_steps=2",
    ]
    assert main(["pipeline", "--config", str(REPO / "configs/pipeline/tiny.yaml"), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    card = (tmp_path / "store" / "runs" / "tiny" / "model" / "README.md").read_text()
    assert summary["model_dir"].endswith("runs/tiny/model")
    assert "## Evaluation" in card and "| scifact | model |" in card and "| scifact | bm25 |" in card
    assert "base_model: minilm" in card and "### `finetune` config" in card

    # `retroflow report` prints the table the run left behind (no Prefect involved)
    assert main(["report", "tiny"]) == 0
    out = capsys.readouterr().out
    reported = json.loads(out.strip().splitlines()[-1])
    assert reported["rows"] == summary["metrics"] and [r["system"] for r in reported["rows"]] == ["model", "bm25"]
    assert "model" in out.splitlines()[2] and (tmp_path / "store" / "runs" / "tiny" / "report.md").read_text().startswith(
        "# pretrain-to-beir: tiny"
    )


SECTIONS_OWN_HOLD_OUT = ["dev_fraction=null", "dev_seed=null", "finetune.data.dev_fraction=0.1", "teacher.dev_fraction=0.1"]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["teacher.dev_fraction=0.3"], "dev_fraction is 0.1 but teacher.dev_fraction is 0.3; give it once"),
        (
            [*SECTIONS_OWN_HOLD_OUT, "teacher.dev_fraction=0.3"],
            "teacher.dev_fraction/dev_seed (0.3, 0) differ from finetune.data's (0.1, 0)",
        ),
        (
            [*SECTIONS_OWN_HOLD_OUT, "evaluate.fusion.dev_seed=5"],
            "evaluate.fusion.dev_fraction/dev_seed (0.1, 5) differ from finetune.data's (0.1, 0)",
        ),
        ([*SECTIONS_OWN_HOLD_OUT, "finetune.data.dev_fraction=0.0"], "queries the student trains on"),
    ],
)
def test_dev_choices_must_use_fine_tunings_hold_out(overrides, named):
    """The teacher's check, the gate and the hybrid's weight are chosen on dev: a dev that fine-tuning trains on is refused,
    whether the hold-out is given once (the pipeline's dev_fraction) or per section."""
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml", overrides)
    assert named in str(info.value)


def test_values_given_once_reach_every_section_that_keeps_them():
    from flows.chain import section_config

    pipeline = load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml", ["dev_fraction=0.25", "dev_seed=3", "seed=5"])
    finetune, teacher, evaluate = (section_config(pipeline, s) for s in ("finetune", "teacher", "evaluate"))
    assert (finetune.data.dev_fraction, finetune.data.dev_seed, finetune.train.seed) == (0.25, 3, 5)
    assert (teacher.dev_fraction, teacher.dev_seed, teacher.seed) == (0.25, 3, 5)
    assert (evaluate.fusion.dev_fraction, evaluate.fusion.dev_seed) == (0.25, 3)
    assert section_config(pipeline, "pretrain").train.seed == 5
    assert pipeline.finetune["data"] == {"rows": "per_positive"}  # the pipeline's own mapping is left as written


def test_a_fixed_fusion_weight_needs_no_dev_hold_out():
    config = load_pipeline_config(
        REPO / "configs" / "pipeline" / "quickstart.yaml",
        [
            "dev_fraction=null",
            "dev_seed=null",
            "teacher.dev_fraction=0.1",
            "finetune.data.dev_fraction=0.0",
            "stages.teacher=false",
            "evaluate.fusion.weight=0.5",
        ],
    )
    assert config.evaluate["fusion"]["weight"] == 0.5


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("exact_below_docs=-1", "exact_below_docs"),
        ("tune.ndcg_tolerance=-0.1", "ndcg_tolerance"),
        ("tune.ndcg_tolerance=1.01", "ndcg_tolerance"),
    ],
)
def test_bad_search_thresholds_are_one_line_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml", [override])
    message = str(info.value)
    assert "\n" not in message and f"field '{field}'" in message


def test_the_index_is_never_tuned_on_the_evaluated_split():
    with pytest.raises(ConfigError, match="tune.dev_split is 'test', the evaluated split"):
        load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml", ["tune.dev_split=test"])


def test_a_small_corpus_is_searched_exactly_and_an_index_shows_exact_beside_it(
    scifact_small, tiny_bert, tmp_path, monkeypatch, one_torch_thread
):
    """Below exact_below_docs the model's row is exact search even though the index is built and
    tuned (on dev, by nDCG); asked for the index (exact_below_docs 0), the row shows exact beside it."""
    from eval.report import metric_rows
    from flows.chain import read_evaluation, run_pipeline
    from flows.run_report import index_section

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    off = [
        "stages.pretrain=false",
        "stages.negatives=false",
        "stages.teacher=false",
        "stages.finetune=false",
        f"model={tiny_bert}",
        "references.hybrid=false",
        "references.bm25=false",
        "tune.ef_search=[4,64]",
    ]
    config = load_pipeline_config(REPO / "configs" / "pipeline" / "tiny.yaml", off)
    assert config.exact_below_docs == 20_000
    result = run_pipeline(config)
    evaluation = result.evaluations["scifact"]
    assert "index" not in evaluation.manifest["inputs"] and evaluation.manifest["inputs"]["embeddings"]["stage"] == "encode"
    scored = read_evaluation(evaluation)
    assert scored["search"] == {"approximate": False, "label": "exact"} and "exact_search" not in scored
    tuned = result.artifacts["tune:scifact"].metrics  # still built and tuned, on dev queries
    assert tuned["dev"]["num_queries"] == 12 and "dev nDCG@10 within 0.001" in tuned["rule"]
    section = index_section(result, config)
    assert "HNSW16" in section and "tuned in" in section and "Not searched through" in section

    through = run_pipeline(config.with_overrides(exact_below_docs=0))
    scored = read_evaluation(through.evaluations["scifact"])
    assert through.evaluations["scifact"].manifest["inputs"]["index"]["stage"] == "tune"
    assert scored["search"]["approximate"] and scored["search"]["label"].startswith("HNSW16 efSearch=")
    exact = read_evaluation(evaluation)
    assert scored["exact_search"]["ndcg@10"] == pytest.approx(exact["ndcg@10"], abs=1e-6)  # the same model, searched exactly
    row = metric_rows({"scifact": scored})[0]
    assert row["ndcg@10 exact"] == round(exact["ndcg@10"], 4)
    assert row["ndcg@10 Δ index"] == pytest.approx(scored["ndcg@10"] - exact["ndcg@10"], abs=1e-4)
    assert "The metric table searched through it" in index_section(through, config)


def test_the_tuner_gets_fine_tunings_dev_hold_out_and_the_evaluations_encoder():
    from flows.chain import section_config

    given_once = section_config(load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml"), "tune")
    assert (given_once.dev_split, given_once.dev_fraction, given_once.dev_seed) == ("train", 0.1, 0)
    assert given_once.encoder.query_max_length == 64 and given_once.ndcg_tolerance == 0.001
    per_section = load_pipeline_config(REPO / "configs" / "pipeline" / "quickstart.yaml", SECTIONS_OWN_HOLD_OUT)
    assert section_config(per_section, "tune").dev_fraction == 0.1
