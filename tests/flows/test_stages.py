"""One word per stage, one contract, one key (docs/architecture.md)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from flows.stages import STAGES, artifact_key, key_config
from retroflow.artifacts import Artifact
from retroflow.inputs import ExternalInput

REPO = Path(__file__).resolve().parents[2]
CHAIN_STAGES = ("data", "pretrain", "negatives", "teacher", "finetune", "encode", "index", "tune", "evaluate")
WITH_PRESETS = ("pretrain", "negatives", "teacher", "finetune", "encode", "index", "tune")


@pytest.mark.parametrize("name", CHAIN_STAGES)
def test_each_stage_has_one_name_for_module_config_command_and_store(name):
    from flows.chain import SECTIONS, PipelineConfig
    from flows.cli import build_parser

    stage = STAGES[name]
    assert list(inspect.signature(stage.run.__func__).parameters) == ["self", "config", "inputs", "out_dir", "partial_dir"]
    run = getattr(__import__(stage.module, fromlist=[stage.run_function]), stage.run_function)
    assert list(inspect.signature(run).parameters)[:4] == ["config", "inputs", "out_dir", "partial_dir"]
    assert stage.config_type().__name__ == stage.config_class
    if name in WITH_PRESETS:
        presets = list((REPO / "configs" / name).glob("*.yaml"))
        assert presets, f"configs/{name}/ holds no preset"
        for preset in presets:  # every preset loads through the stage's own class
            from retroflow.config import load_config

            load_config(stage.config_type(), preset)
    if name != "data":
        assert name in SECTIONS and name in PipelineConfig.model_fields  # the pipeline section
        commands = build_parser()._subparsers._group_actions[0].choices
        assert name in commands  # the command


def test_the_key_holds_what_inputs_are_not_where_they_lie(tmp_path):
    from retrieval.training.negatives import NegativesConfig
    from retroflow.data import DataConfig

    here, there = DataConfig(source="scifact", content_fingerprint="f"), DataConfig(source="/elsewhere/scifact", content_fingerprint="f")
    assert "source" not in key_config("data", here)
    assert artifact_key("data", here, {}) == artifact_key("data", there, {})
    assert artifact_key("data", here, {}) != artifact_key("data", here.with_overrides(content_fingerprint="g"), {})
    data = ExternalInput("d", tmp_path, fingerprint="aaa")
    here = NegativesConfig()
    other = ExternalInput("d", tmp_path, fingerprint="bbb")
    assert artifact_key("negatives", here, {"data": data}) != artifact_key("negatives", here, {"data": other})
    assert artifact_key("negatives", here, {"data": data}) != artifact_key("negatives", here.with_overrides(rank_end=99), {"data": data})
    assert artifact_key("negatives", here, {"data": data, "model": None}) == artifact_key("negatives", here, {"data": data})


def test_build_refuses_an_input_the_stage_does_not_take(tmp_path):
    from flows.stages import build
    from retrieval.serving.index import IndexConfig
    from retroflow.artifacts import ArtifactStore

    with pytest.raises(ValueError, match="stage 'index' takes inputs embeddings; not data"):
        build(ArtifactStore(tmp_path), "index", IndexConfig(), {"data": Artifact("data", "k", tmp_path)})


def test_encode_index_and_tune_from_the_cli_land_in_the_store_under_the_chains_keys(
    scifact_small, tiny_bert, tmp_path, monkeypatch, capsys
):
    """A user's encode -> index -> tune without --output: store artifacts keyed as the chain keys
    them; tuning an index artifact in place (with other queries) is refused instead of altering it."""
    import json

    from flows.cli import main
    from retrieval.serving.index import IndexConfig
    from retrieval.serving.tune import TuneConfig

    monkeypatch.setenv("RETROFLOW_STORE", str(tmp_path / "store"))

    def cli(*argv) -> dict:
        assert main([str(a) for a in argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    encoded = Path(cli("encode", "--model", tiny_bert, "--dataset", scifact_small, "--shard-size", "200")["artifact"])
    indexed = Path(cli("index", "--embeddings", encoded, "--factory", "HNSW16")["artifact"])
    tuned = Path(cli("tune", "--index", indexed, "--num-queries", "20", "--set", "ef_search=[8,16]", "--set", "repeats=1")["artifact"])
    assert [p.parent.name for p in (encoded, indexed, tuned)] == ["encode", "index", "tune"]
    embeddings, index = Artifact.open(encoded), Artifact.open(indexed)
    assert index.key == artifact_key("index", IndexConfig(factory="HNSW16"), {"embeddings": embeddings})
    tune_config = TuneConfig(num_queries=20, ef_search=[8, 16], repeats=1)
    assert Artifact.open(tuned).key == artifact_key("tune", tune_config, {"index": index, "embeddings": embeddings})

    manifest = (indexed / "manifest.json").read_bytes()
    assert main(["tune", "--index", str(indexed), "--dataset", str(scifact_small), "--split", "train"]) == 2
    assert "tuning it in place would change a finished artifact" in capsys.readouterr().err
    assert (indexed / "manifest.json").read_bytes() == manifest


def test_the_resolved_precision_is_in_the_key_not_the_word_auto(tmp_path, monkeypatch):
    from retrieval.serving.encode import EncodeConfig
    from retroflow import devices

    data = ExternalInput("d", tmp_path, fingerprint="aaa")
    model = ExternalInput("m", tmp_path, fingerprint="mmm")
    auto, fp32 = EncodeConfig(), EncodeConfig().with_overrides(encoder={"precision": "fp32"})

    def key(config, native: bool) -> str:
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
        return artifact_key("encode", config, {"data": data, "model": model})

    assert key(auto, True) != key(auto, False)  # bf16 here, fp32 there: different vectors
    assert key(auto, False) == key(fp32, True) == key(fp32, False)  # the same fp32 encoding
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert key_config("encode", auto)["encoder"]["precision"] == "bf16"


@pytest.mark.parametrize(
    "old, new", [("mine-negatives", "negatives"), ("train-teacher", "teacher"), ("index build", "index"), ("index tune", "tune")]
)
def test_an_old_command_spelling_runs_the_new_command_and_says_it_is_deprecated(old, new, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as done:
        main([*old.split(), "--help"])
    assert done.value.code == 0
    out, err = capsys.readouterr()
    assert f"'{old}' is deprecated" in err and f"use '{new}'" in err
    assert out.startswith(f"usage: retroflow {new} ")


def test_the_flow_reads_a_dataset_again_when_its_files_change(scifact_small, tmp_path):
    """The `data` task is cached by the key of the dataset's content, not by its name: the flow
    must not keep using the old `data` artifact after the files under that name were edited."""
    import shutil

    from flows.tasks import step_cache_key
    from retroflow.artifacts import ArtifactStore

    data = tmp_path / "data"
    shutil.copytree(scifact_small, data / "scifact")
    parameters = {"store": ArtifactStore(tmp_path / "store"), "source": "scifact", "data_dir": str(data)}
    before = step_cache_key("data", parameters)
    assert step_cache_key("data", parameters) == before  # unchanged files: the cached task answers
    corpus = data / "scifact" / "corpus.jsonl"
    corpus.write_text("".join(corpus.read_text().splitlines(keepends=True)[:-1]))  # one document fewer
    assert step_cache_key("data", parameters) != before


def test_faiss_gpu_auto_is_keyed_as_it_resolves_here(monkeypatch):
    """An IVF index trained with GPU k-means is another index: `gpu: auto` is keyed as `always`
    where FAISS sees a GPU and `never` where it does not, like an explicit setting."""
    import retrieval.serving.index as index_module
    from retrieval.serving.index import IndexConfig

    ivf = "IVF64,Flat"
    auto, never, always = IndexConfig(factory=ivf), IndexConfig(factory=ivf, gpu="never"), IndexConfig(factory=ivf, gpu="always")
    monkeypatch.setattr(index_module, "gpu_count", lambda: 0)
    assert key_config("index", auto) == key_config("index", never) != key_config("index", always)
    monkeypatch.setattr(index_module, "gpu_count", lambda: 2)
    assert key_config("index", auto) == key_config("index", always)
    assert key_config("index", IndexConfig(factory="HNSW32"))["gpu"] == "auto"  # no k-means: one key everywhere


def test_an_old_spelling_after_a_global_flag_is_still_recognised():
    from flows.cli import modern_argv

    assert modern_argv(["-v", "train-teacher", "--config", "x.yaml"]) == ["-v", "teacher", "--config", "x.yaml"]
    assert modern_argv(["-v", "teacher"]) == ["-v", "teacher"]
