"""The RetroMAE ablation's configs: arms that differ only in the objective, and clear errors."""

from __future__ import annotations

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
    config = load_ablation_config(CONFIGS / "tiny.yaml", ["sweep.decoder_mask_ratio=[0.6]", "sweep.decoder_layers=[2]",
                                                          "sweep.decoder_target_fraction=[0.25]"])  # fmt: skip
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
    monkeypatch.setenv("RETROFLOW_DATA_DIR", str(data))  # data_dir below sets it for the process: restored after
    code = main(["ablation", "--config", str(CONFIGS / "tiny.yaml"), "--set", f"data_dir={data}",
                 "--set", "pretrain_corpora=[]", "--set", f"pretrain_files=[{empty}]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(empty) in err and "no pretraining text" in err, err
    assert not list((tmp_path / "store" / "corpus").glob("*/manifest.json")), "nothing published"


def test_cli_refuses_an_unknown_arm_before_any_work(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))
    assert main(["ablation", "--config", str(CONFIGS / "tiny.yaml"), "--set", "arms=[bert]"]) == 2
    assert "arms[0]: unknown arm 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
