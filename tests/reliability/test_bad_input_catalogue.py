"""The malformed-input catalogue: bad datasets (BEIR, MS MARCO, NQ), configs, models, checkpoints,
vectors and run files, each given to the real command a user would type.

Every case must exit 2 with one `error:` line that names the file and line (or the config
field), print no traceback, and leave nothing in the output directory.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]

DOCS = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate(["alpha beta", "gamma delta", "epsilon zeta"])]
QUERIES = [{"_id": "q1", "text": "alpha"}, {"_id": "q2", "text": "gamma"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td1\t1\n"


def beir(root: Path, corpus: str | bytes | None = None, queries: str | None = None, qrels: str | None = None) -> Path:
    """A valid three-document BEIR dataset, with any one file replaced."""
    (root / "qrels").mkdir(parents=True)
    corpus = corpus if corpus is not None else "".join(json.dumps(d) + "\n" for d in DOCS)
    (root / "corpus.jsonl").write_bytes(corpus if isinstance(corpus, bytes) else corpus.encode())
    (root / "queries.jsonl").write_text(queries if queries is not None else "".join(json.dumps(q) + "\n" for q in QUERIES))
    (root / "qrels" / "test.tsv").write_text(qrels if qrels is not None else QRELS)
    return root


def msmarco(root: Path, collection: str = "0\talpha beta\n1\tgamma delta\n", qrels: str = "1 0 0 1\n") -> Path:
    root.mkdir(parents=True)
    (root / "collection.tsv").write_text(collection)
    (root / "queries.dev.tsv").write_text("1\talpha\n")
    (root / "qrels.dev.tsv").write_text(qrels)
    return root


def nq(root: Path, qa: str) -> Path:
    root.mkdir(parents=True)
    (root / "psgs_w100.tsv").write_text('id\ttext\ttitle\n1\t"alpha beta"\tA\n2\t"gamma delta"\tB\n')
    (root / "nq-test.qa.csv").write_text(qa)
    return root


def evaluate(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", "bm25", "--dataset", str(dataset), "--no-registry", "--output", str(out), *extra]


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], list[str]]  # (tmp dir, output dir) -> argv
    names: str  # regex the error line must match: the file and line, or the field


def damaged_model(tmp: Path, tiny_bert: Path, damage: str) -> Path:
    model = tmp / "model"
    shutil.copytree(tiny_bert, model)
    if damage == "config":
        (model / "config.json").write_text("{ not json")
    else:
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    return model


CASES = [
    Case(
        "beir: malformed JSON line",
        lambda t, o: evaluate(beir(t / "ds", corpus='{"_id": "d0", "text": "a"}\n{"_id": "d1" "text": "b"}\n'), o),
        r"ds/corpus\.jsonl, line 2: malformed JSON",
    ),
    Case(
        "beir: empty _id", lambda t, o: evaluate(beir(t / "ds", corpus='{"_id": "", "text": "a"}\n'), o), r"ds/corpus\.jsonl, line 1: .*_id"
    ),
    Case(
        "beir: numeric _id",
        lambda t, o: evaluate(beir(t / "ds", corpus='{"_id": 1.0, "text": "a"}\n'), o),
        r"ds/corpus\.jsonl, line 1: .*_id",
    ),
    Case(
        "beir: duplicate document id",
        lambda t, o: evaluate(beir(t / "ds", corpus='{"_id": "d0", "text": "a"}\n{"_id": "d0", "text": "b"}\n'), o),
        r"ds/corpus\.jsonl, line 2: .*d0",
    ),
    Case(
        "beir: text is not UTF-8",
        lambda t, o: evaluate(beir(t / "ds", corpus=b'{"_id": "d0", "text": "caf\xe9"}\n'), o),
        r"ds/corpus\.jsonl.*line 1.*UTF-8",
    ),
    Case(
        "beir: no queries file",
        lambda t, o: (lambda d: (d / "queries.jsonl").unlink() or evaluate(d, o))(beir(t / "ds")),
        r"queries\.jsonl",
    ),
    Case(
        "qrels: score is not an integer",
        lambda t, o: evaluate(beir(t / "ds", qrels="query-id\tcorpus-id\tscore\nq1\td0\thigh\n"), o),
        r"qrels/test\.tsv, line 2: .*score",
    ),
    Case(
        "qrels: one pair graded twice, differently",
        lambda t, o: evaluate(beir(t / "ds", qrels=QRELS + "q1\td0\t2\n"), o),
        r"qrels/test\.tsv, line 4: .*q1.*d0",
    ),
    Case(
        "qrels: score too large for any grade",
        lambda t, o: evaluate(beir(t / "ds", qrels="query-id\tcorpus-id\tscore\nq1\td0\t99999999999\n"), o),
        r"qrels/test\.tsv, line 2: field 'score' 99999999999 is out of range",
    ),
    Case(
        "beir: boolean _id",
        lambda t, o: evaluate(beir(t / "ds", corpus='{"_id": true, "text": "a"}\n'), o),
        r"ds/corpus\.jsonl, line 1: .*_id",
    ),
    Case(
        "qrels: unknown document",
        lambda t, o: evaluate(beir(t / "ds", qrels="query-id\tcorpus-id\tscore\nq1\tnope\t1\n"), o),
        r"qrels/test\.tsv, line 2: .*nope",
    ),
    Case(
        "msmarco: empty collection",
        lambda t, o: evaluate(msmarco(t / "mm", collection=""), o, "--suite", "msmarco", "--split", "dev"),
        r"mm/collection\.tsv: the collection is empty",
    ),
    Case(
        "msmarco: qrels line with two fields",
        lambda t, o: evaluate(msmarco(t / "mm", qrels="1 0\n"), o, "--suite", "msmarco", "--split", "dev"),
        r"mm/qrels\.dev\.tsv, line 1: expected",
    ),
    Case(
        "msmarco: one pair graded twice, differently",
        lambda t, o: evaluate(msmarco(t / "mm", qrels="1 0 0 1\n1 0 0 2\n"), o, "--suite", "msmarco", "--split", "dev"),
        r"mm/qrels\.dev\.tsv, line 2: query '1', passage '0' graded 2",
    ),
    Case(
        "msmarco: grade too large",
        lambda t, o: evaluate(msmarco(t / "mm", qrels="1 0 0 99999999999\n"), o, "--suite", "msmarco", "--split", "dev"),
        r"mm/qrels\.dev\.tsv, line 1: field 'score' 99999999999 is out of range",
    ),
    Case(
        "nq: qa line without answers",
        lambda t, o: evaluate(nq(t / "nq", "who is alpha\n"), o, "--suite", "nq"),
        r"nq-test\.qa\.csv, line 1: expected 2",
    ),
    Case(
        "run file: wrong number of fields",
        lambda t, o: evaluate(beir(t / "ds"), o, "--run-file", str(write(t / "run.txt", "q1 d0\n"))),
        r"run\.txt, line 1: expected",
    ),
    Case(
        "run file: rank is not a number",
        lambda t, o: evaluate(beir(t / "ds"), o, "--run-file", str(write(t / "run.txt", "q1 d0 first\n"))),
        r"run\.txt, line 1: .*not a number",
    ),
    Case("config: unknown evaluate field", lambda t, o: evaluate(beir(t / "ds"), o, "--set", "nonsense=1"), r"nonsense"),
    Case(
        "config: finetune learning rate below zero",
        lambda t, o: [
            "finetune",
            "--config",
            str(REPO / "configs/finetune/tiny.yaml"),
            "--dataset",
            str(beir(t / "ds")),
            "--output",
            str(o),
            "--set",
            "train.lr=-1",
        ],
        r"train\.lr",
    ),
    Case(
        "config: typo in a pipeline stage section",
        lambda t, o: ["pipeline", "--config", str(write(t / "p.yaml", pipeline_with_typo(t)))],
        r"finetune.*trian",
    ),
    Case("config: fusion weight outside [0, 1]", lambda t, o: evaluate(beir(t / "ds"), o, "--set", "fusion.weight=1.5"), r"fusion\.weight"),
    Case(
        "config: unknown ablation arm",
        lambda t, o: ["ablation", "--config", str(REPO / "configs/ablation/tiny.yaml"), "--set", "arms=[mlm,bert]"],
        r"arms\[1\]: unknown arm 'bert'",
    ),
    Case(
        "config: ablation sweep ratio outside (0, 1)",
        lambda t, o: ["ablation", "--config", str(REPO / "configs/ablation/tiny.yaml"), "--set", "sweep.decoder_mask_ratio=[1.5]"],
        r"sweep\.decoder_mask_ratio",
    ),
    Case("config: tune nDCG tolerance above 1", lambda t, o: ["tune", "--index", str(o), "--ndcg-tolerance", "1.5"], r"ndcg_tolerance"),
    Case(
        "config: pipeline exact_below_docs below 0",
        lambda t, o: ["pipeline", "--config", str(REPO / "configs/pipeline/tiny.yaml"), "--set", "exact_below_docs=-1"],
        r"exact_below_docs",
    ),
    Case(
        "vectors: truncated embeddings.npy",
        lambda t, o: ["index", "build", "--embeddings", str(truncated_embeddings(t)), "--output", str(o)],
        r"embeddings\.npy: not a complete \.npy vectors file",
    ),
    Case(
        "--set: a value that is not YAML",
        lambda t, o: evaluate(beir(t / "ds"), o, "--set", "top_k=[10"),
        r"override 'top_k=\[10': the value is not valid YAML",
    ),
    Case(
        "--output: an existing folder where the result file goes",
        lambda t, o: (o.mkdir(), evaluate(beir(t / "ds"), o))[1],
        r"out: is a directory",
    ),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def pipeline_with_typo(tmp: Path) -> str:
    text = (REPO / "configs/pipeline/tiny.yaml").read_text()
    return text + "\nfinetune:\n  trian:\n    lr: 0.001\n"


def truncated_embeddings(tmp: Path) -> Path:
    import numpy as np

    from retrieval.serving.encode import write_embeddings

    folder = tmp / "embeddings"
    write_embeddings(folder, np.ones((20, 8), dtype=np.float32), [f"d{i}" for i in range(20)])
    vectors = folder / "embeddings.npy"
    vectors.write_bytes(vectors.read_bytes()[:300])
    return folder


def check_user_error(argv: list[str], names: str, out: Path, capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and re.search(names, errors[0]), err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), f"left behind: {sorted(p.name for p in out.iterdir())}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, capsys):
    out = tmp_path / "out"
    check_user_error(case.build(tmp_path, out), case.names, out, capsys)


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_damaged_model_is_one_clear_error(damage, tiny_bert, tmp_path, capsys):
    model = damaged_model(tmp_path, tiny_bert, damage)
    argv = ["evaluate", "--model", str(model), "--dataset", str(beir(tmp_path / "ds")), "--no-registry", "--output", str(tmp_path / "out")]
    check_user_error(argv, r"model: the model could not be loaded", tmp_path / "out", capsys)


def test_a_damaged_checkpoint_is_one_clear_error_on_resume(scifact_small, tiny_bert, tmp_path):
    from retrieval.training.finetune import FinetuneConfig, run
    from retroflow.config import load_config
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of, model_input

    out, overrides = tmp_path / "run", ["train.save_every=2", "train.max_steps=4"]
    config = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", overrides)
    inputs = inputs_of(data=dataset_input(scifact_small), model=model_input(tiny_bert))
    run(config, inputs, out, out / "partial", stop_after=2)  # as if killed at step 2
    weights = out / "partial" / "checkpoints" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    argv = [
        "finetune",
        "--config",
        str(REPO / "configs/finetune/tiny.yaml"),
        "--dataset",
        str(scifact_small),
        "--model",
        str(tiny_bert),
        "--output",
        str(out),
        *[a for o in overrides for a in ("--set", o)],
        "--resume",
    ]
    # as a shell runs it: in-process, log handlers that earlier tests left on closed streams would add noise
    done = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, cwd=REPO)
    err = done.stderr
    assert done.returncode == 2 and "Traceback" not in err, err
    assert re.search(
        r"checkpoint-2: damaged checkpoint .*delete checkpoint-2", [line for line in err.splitlines() if line.startswith("error:")][0]
    )


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """The same through the real entry point: exit status and stderr as a shell sees them."""
    dataset = beir(tmp_path / "ds", qrels="query-id\tcorpus-id\tscore\nq1\td0\thigh\n")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *evaluate(dataset, tmp_path / "out")], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()][-1].startswith(f"error: {dataset}/qrels/test.tsv, line 2")


def test_finetune_output_never_replaces_a_model_folder_that_holds_no_model(scifact_small, tiny_bert, tmp_path, capsys):
    """`retroflow finetune --output proj` where `proj/model/` is the user's folder of notes: one
    line before any training, and the notes stay."""
    notes = tmp_path / "proj" / "model" / "my_notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    argv = ["finetune", "--config", str(REPO / "configs/finetune/tiny.yaml"), "--dataset", str(scifact_small)]
    code = main([*argv, "--model", str(tiny_bert), "--output", str(tmp_path / "proj"), "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert re.search(r"proj/model: already exists \(holds no model", err), err[-2000:]
    assert notes.read_text() == "mine" and sorted(p.name for p in notes.parent.iterdir()) == ["my_notes.txt"]
