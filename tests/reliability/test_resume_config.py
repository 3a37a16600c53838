"""`--resume` continues a checkpoint only under the config it was trained with (issue 22, item 4).

Every trained stage (pretraining, fine-tuning, the cross-encoder teacher) stores its canonical
config in each checkpoint; a resume whose config differs in anything but step counts, logging and
saving intervals or the device is refused with the differing fields named, before any weight is
loaded. Damaged checkpoint metadata (a truncated trainer_state.json, a scheduler.json with wrong
types) is a one-line error naming the file (items 8 and 10).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retroflow.checkpoints import DamagedCheckpointError, list_checkpoints
from retroflow.config import load_config
from retroflow.training import ResumeConfigError, config_differences

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pretrain_config(shared_data: Path, tmp: Path, **train):
    from retromae.config import PretrainConfig

    return PretrainConfig.model_validate(
        {
            "model": {"init": None, "preset": "tiny", "vocab_size": 400, "dropout": 0.0},
            "data": {
                "beir_corpus": str(shared_data / "scifact" / "corpus.jsonl"),
                "max_docs": 40,
                "max_seq_length": 32,
                "cache_dir": str(tmp / "cache"),
            },
            "train": {
                "seed": 7,
                "max_steps": 8,
                "batch_size": 4,
                "lr": 5e-3,
                "warmup_ratio": 0.0,
                "save_every": 2,
                "log_every": 4,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def stopped_pretrain(shared_data: Path, tmp_path_factory) -> Path:
    """A pretraining run stopped after step 4 (checkpoints at 2 and 4)."""
    from retromae.pretrain import run as pretrain

    tmp = tmp_path_factory.mktemp("stopped-pretrain")
    pretrain(pretrain_config(shared_data, tmp), {}, tmp / "out", tmp / "partial", stop_after=4)
    assert [p.name for p in list_checkpoints(tmp / "partial" / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    return tmp


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source / "partial", dest / "partial")
    return dest


def test_pretrain_resume_with_another_lr_or_mask_ratio_is_refused(stopped_pretrain: Path, shared_data: Path, tmp_path: Path):
    from retromae.pretrain import run as pretrain

    run = copy_run(stopped_pretrain, tmp_path)
    changed = pretrain_config(shared_data, stopped_pretrain, lr=1e-3).with_overrides(encoder_mask_ratio=0.2)
    with pytest.raises(ResumeConfigError) as err:
        pretrain(changed, {}, run / "out", run / "partial")
    message = str(err.value)
    assert "\n" not in message and "checkpoint-4" in message
    assert "train.lr: 0.005 -> 0.001" in message and "encoder_mask_ratio: 0.3 -> 0.2" in message
    assert not (run / "out" / "encoder").exists()


def test_pretrain_resume_may_change_steps_intervals_and_device(stopped_pretrain: Path, shared_data: Path, tmp_path: Path):
    from retromae.pretrain import run as pretrain

    run = copy_run(stopped_pretrain, tmp_path)
    longer = pretrain_config(shared_data, stopped_pretrain, max_steps=6, log_every=3, save_every=5, keep_checkpoints=3, device="cpu")
    metrics = pretrain(longer, {}, run / "out", run / "partial")
    assert metrics["resumed_from"] == 4 and metrics["steps"] == 6


def test_config_differences_ignore_only_the_resumable_fields():
    saved = {"train": {"lr": 1e-4, "max_steps": 10, "device": "auto"}, "objective": "retromae"}
    assert config_differences(saved, {"train": {"lr": 1e-4, "max_steps": 20, "device": "cpu"}, "objective": "retromae"}) == []
    assert config_differences(saved, {"train": {"lr": 1e-4, "max_steps": 10, "device": "auto"}, "objective": "mlm"}) == [
        "objective: 'retromae' -> 'mlm'"
    ]
    assert config_differences(saved, {"train": {"max_steps": 10, "device": "auto"}, "objective": "retromae"}) == [
        "train.lr: 0.0001 -> (absent)"
    ]


def test_finetune_resume_with_another_config_is_refused(scifact_small: Path, tiny_bert: Path, tmp_path: Path):
    from retrieval.training.finetune import FinetuneConfig, run
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of, model_input

    inputs = inputs_of(data=dataset_input(scifact_small), model=model_input(tiny_bert))
    tiny = REPO / "configs/finetune/tiny.yaml"
    config = load_config(FinetuneConfig, tiny, ["train.max_steps=4", "train.save_every=2", "data.max_queries=16"])
    run(config, inputs, tmp_path / "out", tmp_path / "partial", stop_after=2)
    changed = load_config(
        FinetuneConfig,
        tiny,
        ["train.max_steps=4", "train.save_every=2", "data.max_queries=16", "train.lr=1e-3", "negatives.hard_negatives=2"],
    )
    with pytest.raises(ResumeConfigError, match=r"negatives\.hard_negatives: 1 -> 2; train\.lr: 0\.0005 -> 0\.001"):
        run(changed, inputs, tmp_path / "out", tmp_path / "partial")
    longer = load_config(FinetuneConfig, tiny, ["train.max_steps=5", "train.save_every=3", "data.max_queries=16", "train.log_every=1"])
    assert run(longer, inputs, tmp_path / "out", tmp_path / "partial")["resumed_from"] == 2


def test_teacher_resume_with_another_config_is_refused(scifact_small: Path, tiny_bert: Path, tmp_path: Path):
    from retrieval.training import negatives as negatives_stage
    from retrieval.training import teacher
    from retroflow.data import dataset_input
    from retroflow.inputs import inputs_of, model_input, path_input

    data = dataset_input(scifact_small)
    mining = negatives_stage.NegativesConfig(rank_start=0, rank_end=10)
    negatives_stage.run(mining, inputs_of(data=data), tmp_path / "neg", tmp_path / "neg-p")
    inputs = inputs_of(data=data, init=model_input(tiny_bert), negatives=path_input(tmp_path / "neg" / "negatives.jsonl"))
    common = ["max_queries=8", "candidates_per_query=2", "save_every=2"]
    tiny = REPO / "configs/teacher/tiny.yaml"
    out, partial = tmp_path / "out", tmp_path / "partial"
    teacher.run(load_config(teacher.TeacherConfig, tiny, [*common, "max_steps=4"]), inputs, out, partial, stop_after=2)
    with pytest.raises(ResumeConfigError, match=r"lr: 0\.0005 -> 0\.0001"):
        teacher.run(load_config(teacher.TeacherConfig, tiny, [*common, "max_steps=4", "lr=1e-4"]), inputs, out, partial)


def damaged_resume(stopped_pretrain: Path, shared_data: Path, tmp_path: Path, file: str, text: str) -> str:
    from retromae.pretrain import run as pretrain

    run = copy_run(stopped_pretrain, tmp_path)
    (run / "partial" / "checkpoints" / "checkpoint-4" / file).write_text(text)
    with pytest.raises(DamagedCheckpointError) as err:
        pretrain(pretrain_config(shared_data, stopped_pretrain), {}, run / "out", run / "partial")
    message = str(err.value)
    assert "\n" not in message and f"checkpoint-4/{file}" in message and "delete checkpoint-4" in message
    return message


def test_truncated_trainer_state_names_the_file(stopped_pretrain: Path, shared_data: Path, tmp_path: Path):
    full = (stopped_pretrain / "partial" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text()
    damaged_resume(stopped_pretrain, shared_data, tmp_path, "trainer_state.json", full[: len(full) // 2])


def test_scheduler_state_with_wrong_types_names_the_field(stopped_pretrain: Path, shared_data: Path, tmp_path: Path):
    saved = json.loads((stopped_pretrain / "partial" / "checkpoints" / "checkpoint-4" / "scheduler.json").read_text())
    message = damaged_resume(stopped_pretrain, shared_data, tmp_path, "scheduler.json", json.dumps({**saved, "last_epoch": "four"}))
    assert "last_epoch" in message
