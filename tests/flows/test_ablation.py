"""The RetroMAE ablation's configs: arms that differ only in the objective, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.ablation import OBJECTIVE_FIELDS, arm_pretrain_configs, load_ablation_config, parse_arm
from retroflow.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "ablation"


def differing_fields(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out |= differing_fields(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("name", ["tiny", "miniature", "paper"])
def test_arms_differ_only_in_the_pretraining_objective(name):
    config = load_ablation_config(CONFIGS / f"{name}.yaml")
    configs = {arm: c.canonical() for arm, c in arm_pretrain_configs(config, seed=3).items()}
    baseline = configs[config.baseline]
    for arm, canonical in configs.items():
        _, sweep = parse_arm(arm)
        assert differing_fields(baseline, canonical) <= OBJECTIVE_FIELDS | set(sweep), arm
        assert canonical["model"]["init"] is None and canonical["train"]["seed"] == 3  # from scratch, the study's seed
    objectives = {(c["objective"], c["decoding"] if c["objective"] == "retromae" else None) for c in configs.values()}
    assert {("mlm", None), ("retromae", "basic"), ("retromae", "enhanced")} <= objectives


def test_paper_defaults_for_each_decoding():
    configs = arm_pretrain_configs(load_ablation_config(CONFIGS / "miniature.yaml"), seed=1)
    assert configs["retromae-enhanced"].decoder_mask_ratio == 0.5 and configs["retromae-basic"].decoder_mask_ratio == 0.7
    assert {c.encoder_mask_ratio for c in configs.values()} == {0.3}


def test_sweeps_become_arms_of_their_own():
    config = load_ablation_config(
        CONFIGS / "tiny.yaml", ["sweep.decoder_mask_ratio=[0.6]", "sweep.decoder_layers=[2]", "sweep.decoder_target_fraction=[0.25]"]
    )
    configs = arm_pretrain_configs(config, seed=1)
    assert configs["retromae-enhanced@decoder_mask_ratio=0.6"].decoder_mask_ratio == 0.6
    assert configs["retromae-enhanced@decoder_layers=2"].decoder_layers == 2
    assert configs["retromae-enhanced@decoder_target_fraction=0.25"].decoder_target_fraction == 0.25


@pytest.mark.parametrize(
    "override, named",
    [
        ("arms=[mlm,retromae-fancy]", "arms[1]: unknown arm 'retromae-fancy'"),
        ("sweep.decoder_mask_ratio=[0.5,1.2]", "sweep.decoder_mask_ratio"),
        ("sweep.encoder_mask_ratio=[0.0]", "sweep.encoder_mask_ratio"),
        ("sweep.decoder_target_fraction=[1.5]", "sweep.decoder_target_fraction"),
        ("arms=[mlm,retromae-enhanced@decoder_mask=0.6]", "arms[1]"),
        ("baseline=retromae-basic2", "baseline 'retromae-basic2'"),
        ("pretrain.objective=mlm", "section 'pretrain'"),
    ],
)
def test_bad_ablation_configs_name_the_field(override, named):
    with pytest.raises(ConfigError) as err:
        load_ablation_config(CONFIGS / "tiny.yaml", [override])
    assert named in str(err.value)


def test_cli_refuses_an_empty_pretraining_file_naming_it(scifact_small, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    empty = tmp_path / "notes.txt"
    empty.write_text("\n   \n\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("RETROFLOW_DATA_DIR", raising=False)  # `scifact` is found through data_dir alone
    code = main(
        [
            "ablation",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--set",
            f"data_dir={data}",
            "--set",
            "pretrain_corpora=[]",
            "--set",
            f"pretrain_files=[{empty}]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(empty) in err and "no pretraining text" in err, err
    assert not list((tmp_path / "store" / "corpus").glob("*/manifest.json")), "nothing published"
    assert list((tmp_path / "store" / "data").glob("*/manifest.json")), "the datasets were read from data_dir"
    assert "RETROFLOW_DATA_DIR" not in os.environ  # and the process environment left alone


def test_cli_refuses_an_unknown_arm_before_any_work(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    assert main(["ablation", "--config", str(CONFIGS / "tiny.yaml"), "--set", "arms=[bert]"]) == 2
    assert "arms[0]: unknown arm 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- continued pretraining (init: a sentence encoder)


@pytest.fixture(scope="module")
def tiny_sentence_encoder(tiny_bert, tmp_path_factory):
    """The tiny BERT saved as a mean-pooling, normalising sentence-transformers model (as MiniLM is)."""
    import shutil

    from retroflow.models import write_sentence_transformer_files

    dest = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_bert, dest)
    write_sentence_transformer_files(dest, pooling="mean", normalize=True, max_seq_length=64, dim=64)
    return dest


def test_continued_arms_differ_only_in_the_objective_and_start_from_the_init():
    config = load_ablation_config(CONFIGS / "continued-minilm.yaml")
    configs = {arm: c.canonical() for arm, c in arm_pretrain_configs(config, seed=2).items()}
    for arm, canonical in configs.items():
        assert differing_fields(configs["none"], canonical) <= OBJECTIVE_FIELDS, arm
        assert canonical["model"]["init"] == "minilm" and canonical["bottleneck"] == "init" and canonical["train"]["epochs"] == 1
    assert [(p.arm, p.against) for p in config.primary] == [("retromae-enhanced", "none"), ("retromae-enhanced", "mlm")]


@pytest.mark.parametrize(
    "override, named",
    [
        ("arms=[none,retromae-huge]", "arms[1]: unknown arm 'retromae-huge'"),
        ("primary=[{arm: retromae-basic, against: none}]", "primary[0]: 'retromae-basic' is not one of the arms"),
        (
            "pretrain.train.epochs=null;pretrain.train.max_steps=10;pretrain.train.head_warmup_steps=10",
            "train.head_warmup_steps (10) must be shorter than the run (train.max_steps 10)",
        ),
        ("pretrain.train.max_steps=10", "train.epochs and train.max_steps"),
    ],
)
def test_bad_continued_configs_name_the_field(override, named):
    with pytest.raises(ConfigError) as err:
        load_ablation_config(CONFIGS / "continued-minilm.yaml", override.split(";"))
    assert named in str(err.value)


@pytest.mark.slow
def test_continued_ablation_runs_end_to_end_then_recomputes_nothing(scifact_small, tiny_sentence_encoder, tmp_path, monkeypatch, capsys):
    import json

    from flows import stages
    from flows.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "scifact").symlink_to(scifact_small)
    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    args = [
        "ablation",
        "--config",
        str(CONFIGS / "tiny-continued.yaml"),
        "--set",
        f"data_dir={data}",
        "--set",
        f"init={tiny_sentence_encoder}",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    primary = {row["comparison"]: row for row in summary["primary"]}
    assert set(primary) == {"retromae-enhanced vs none", "retromae-enhanced vs mlm"}
    assert all(row["queries"] > 0 and row["p_holm"] >= row["p"] for row in primary.values())
    pretrained = [json.loads(m.read_text()) for m in (tmp_path / "store" / "pretrain").glob("*/manifest.json")]
    assert sorted(m["metrics"]["objective"] for m in pretrained) == ["mlm", "retromae"]
    assert {m["metrics"]["bottleneck"] for m in pretrained} == {"mean"}  # the init's pooling
    assert all(m["metrics"]["heldout_step_history"] for m in pretrained)
    finetuned = [json.loads(m.read_text())["metrics"] for m in (tmp_path / "store" / "finetune").glob("*/manifest.json")]
    assert len(finetuned) == 3 and all(m["pretrain_gate"] is None and m["distill"] == "kl" for m in finetuned)  # ungated, alike

    def no_rebuild(*a, **k):
        raise AssertionError("a cached re-run rebuilt a step")

    monkeypatch.setattr(stages.Stage, "run", no_rebuild)
    assert main(args) == 0
