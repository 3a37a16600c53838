"""Messages that name the real cause (issue 22, item 10): flags are strings, hybrid needs a dense
model, empty files are called empty, MS MARCO errors point at the user's file and line.

Each case runs the command a user would type and expects exit 2 with one `error:` line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_bad_input_catalogue import beir, evaluate, msmarco, nq

from flows.cli import main


def error_line(argv: list[str], capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value", ["0123", "null", "yes", "1e3"])
def test_flag_values_stay_strings(value: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(evaluate(Path(value), tmp_path / "out"), capsys)
    assert f"'{value}'" in line and "got" not in line, line


def test_set_values_are_still_yaml_and_flags_are_not(tmp_path: Path):
    from eval.cli import config_from_args, target_from_args
    from flows.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--dataset", "0123", "--set", "top_k=0x10", "--metrics", "ndcg@10, recall@100"])
    config = config_from_args(args)
    assert (target_from_args(args).dataset, config.top_k, list(config.metrics)) == ("0123", 16, ["ndcg@10", "recall@100"])


def test_a_config_that_still_names_an_input_says_which_flag_took_its_place(tmp_path: Path):
    from retrieval.training.finetune import FinetuneConfig
    from retroflow.config import ConfigError, load_config

    old = tmp_path / "old-finetune.yaml"
    old.write_text("dataset: ../shared/data/scifact\ninit: minilm\ntrain: {lr: 2.0e-5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, old)
    message = str(err.value)
    assert "old-finetune.yaml" in message and "\n" not in message
    assert "field 'dataset' is an input now: pass --dataset" in message and "field 'init' is an input now: pass --model" in message


def test_hybrid_with_bm25_as_the_dense_model_says_so(tmp_path: Path, capsys):
    argv = [
        "evaluate",
        "--model",
        "hybrid:bm25",
        "--dataset",
        str(beir(tmp_path / "ds")),
        "--no-registry",
        "--output",
        str(tmp_path / "out"),
    ]
    line = error_line(argv, capsys)
    assert "hybrid:bm25" in line and "dense model" in line and "hub" not in line


def test_empty_nq_passages_file_is_called_empty(tmp_path: Path, capsys):
    root = nq(tmp_path / "nq", "who is alpha\t['beta']\n")
    (root / "psgs_w100.tsv").write_text("")
    line = error_line(evaluate(root, tmp_path / "out", "--suite", "nq"), capsys)
    assert re.search(r"nq/psgs_w100\.tsv: the passages file is empty", line) and "CSV" not in line


@pytest.mark.parametrize(
    "qrels, expected",
    [
        ("1 0 0 1\n1 0 7 1\n", r"mm/qrels\.dev\.tsv, line 2: passage id '7' is not in .*mm/collection\.tsv"),
        ("1 0 0 1\n5 0 1 1\n", r"mm/qrels\.dev\.tsv, line 2: query id '5' is not in the queries files \(queries\.dev\.tsv\)"),
        ("", r"mm/qrels\.dev\.tsv: no judgments"),
    ],
)
def test_msmarco_qrels_errors_name_the_users_file_and_line(qrels: str, expected: str, tmp_path: Path, capsys):
    line = error_line(evaluate(msmarco(tmp_path / "mm", qrels=qrels), tmp_path / "out", "--suite", "msmarco", "--split", "dev"), capsys)
    assert re.search(expected, line), line
    assert "cache" not in line, line


@pytest.mark.parametrize("qrels", ["", "query-id\tcorpus-id\tscore\n"], ids=["empty", "header-only"])
def test_empty_beir_qrels_file_is_named(qrels: str, tmp_path: Path, capsys):
    line = error_line(evaluate(beir(tmp_path / "ds", qrels=qrels), tmp_path / "out"), capsys)
    assert re.search(r"ds/qrels/test\.tsv: no judgments", line) and "no split" not in line, line


def test_truncated_trainer_state_is_named(tmp_path: Path):
    from retroflow.checkpoints import TRAINER_STATE, DamagedCheckpointError, read_trainer_state

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 3, "loss_history": [1.0, 2.0]})[:20])
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint-3/trainer_state\.json: damaged checkpoint \(JSONDecodeError"):
        read_trainer_state(checkpoint)
