"""Natural Questions: DPR's answer matching on tricky answers, top-k accuracy, readers, the CLI."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from eval.evaluate import EvaluateConfig, Target, evaluate
from flows.cli import main
from retroflow.config import ConfigError, load_config
from retroflow.data.beir import DatasetError
from retroflow.data.nq import dpr_tokens, exact_match, has_answer, load_nq, normalize_answer, read_passages, read_qa_file, score_answers


@pytest.fixture(autouse=True)
def _tmp_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETROFLOW_REGISTRY", str(tmp_path / "registry.parquet"))


# --- DPR normalisation and matching ----------------------------------------------------


def test_tokens_are_nfd_lowercased_with_punctuation_split_off() -> None:
    assert dpr_tokens("The U.S. Army, 1,000 men!") == ["the", "u", ".", "s", ".", "army", ",", "1", ",", "000", "men", "!"]
    assert dpr_tokens("Café") == ["cafe\u0301"]  # NFD: the accent stays in the word as a combining mark


@pytest.mark.parametrize(
    "answer, text, expected",
    [
        # accents: precomposed and decomposed spellings are the same after NFD ...
        ("Beyonc\u00e9", "Beyonce\u0301 released Lemonade.", True),
        ("Beyonce\u0301", "Beyonc\u00e9 released Lemonade.", True),
        # ... but an accent is not dropped: DPR does not strip diacritics
        ("Beyonce", "Beyonc\u00e9 released Lemonade.", False),
        # case
        ("barack OBAMA", "President Barack Obama spoke.", True),
        # punctuation is a token of its own: it must match, and it splits words
        ("U.S.", "The U.S. Army was formed in 1775.", True),
        ("U.S.", "The US Army was formed in 1775.", False),
        ("Washington, D.C.", "He moved to Washington, D.C. in 1990.", True),
        ("Jay-Z", "Jay - Z performed.", True),
        ("1,000", "about 1,000 soldiers", True),
        ("1000", "about 1,000 soldiers", False),
        # articles are ordinary tokens in retriever matching
        ("Beatles", "The Beatles were a rock band.", True),
        ("the Beatles", "Beatles albums sold well.", False),
        # token-level, not substring
        ("art", "They went to a party.", False),
        ("art", "Modern art, in brief.", True),
        ("New York", "New Yorkers", False),
        # empty answers never match (DPR's loop would match them anywhere)
        ("", "anything", False),
        ("...", "Wait... what", True),
    ],
)
def test_has_answer_on_tricky_answers(answer: str, text: str, expected: bool) -> None:
    assert has_answer([answer], text) is expected


def test_any_answer_suffices_and_regex_mode_matches_patterns() -> None:
    assert has_answer(["Paris", "Lutetia"], "Roman Lutetia became a city.")
    assert not has_answer(["Paris", "Lutetia"], "Lyon is in France.")
    assert has_answer([r"19[0-9]{2}"], "It happened in 1984.", match="regex")
    assert not has_answer([r"19[0-9]{2}"], "It happened in 2084.", match="regex")
    assert not has_answer(["(unclosed"], "(unclosed", match="regex")  # an invalid pattern matches nothing
    assert has_answer(["cafe\u0301"], "Le Caf\u00e9", match="regex")  # NFD on both sides, case-insensitive


def test_reader_normalisation_drops_case_punctuation_and_articles() -> None:
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theater") == "theater"  # 'the' only as a whole word
    assert exact_match("the Beatles", ["Beatles"]) and not exact_match("Beatle", ["Beatles"])


# --- top-k accuracy by hand --------------------------------------------------------------


def test_top_k_accuracy_counts_the_first_answer_passage() -> None:
    passages = {"p1": "nothing here", "p2": "Paris is in France", "p3": "the capital is Paris", "p4": "Rome, Italy", "p5": "Berlin"}
    answers = {"q1": ["Paris"], "q2": ["Rome"], "q3": ["Madrid"], "q4": ["Berlin"]}
    run = {
        "q1": {"p1": 0.9, "p3": 0.8, "p2": 0.7},  # first answer at rank 2
        "q2": {"p4": 0.5, "p1": 0.4},  # rank 1
        "q3": {"p1": 0.9, "p2": 0.8, "p3": 0.7},  # never
        # q4 is missing from the run: counts as unanswered
    }
    means, per_query = score_answers(run, answers, passages, ["accuracy@1", "accuracy@2", "accuracy@5"])
    assert per_query["accuracy@1"] == {"q1": 0.0, "q2": 1.0, "q3": 0.0, "q4": 0.0}
    assert per_query["accuracy@2"] == {"q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 0.0}
    assert means == pytest.approx({"accuracy@1": 0.25, "accuracy@2": 0.5, "accuracy@5": 0.5})


def test_ties_in_the_run_rank_the_larger_passage_id_first() -> None:
    passages = {"a": "Paris", "b": "nothing"}
    means, _ = score_answers({"q": {"a": 1.0, "b": 1.0}}, {"q": ["Paris"]}, passages, ["accuracy@1"])
    assert means["accuracy@1"] == 0.0  # "b" > "a": b is rank 1


# --- readers -----------------------------------------------------------------------------

PSGS = [
    ("1", 'Aaron Aaron ( or ; ""Ahärôn"") is a prophet, high priest, and the brother of Moses.', "Aaron"),
    ("2", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, completed in 1889.", "Eiffel Tower"),
    ("3", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.", "Mount Everest"),
    ("4", "William Shakespeare wrote Hamlet around 1600; it is set in Denmark.", "Hamlet"),
    ("5", "The Amazon is the largest rainforest, covering much of the Amazon basin of South America.", "Amazon rainforest"),
    ("6", "Photosynthesis in plants uses chlorophyll to capture light.", "Photosynthesis"),
]
QUESTIONS = [
    ("who is the brother of moses", ["Aaron"]),
    ("when was the eiffel tower completed", ["1889"]),
    ("who wrote hamlet", ["William Shakespeare", "Shakespeare"]),
    ("what is the highest mountain", ["Mount Everest", "Everest"]),
    ("what is the capital of australia", ["Canberra"]),  # in no passage
]


def write_dpr_dir(root: Path) -> Path:
    """DPR's layout: wikipedia_split/psgs_w100.tsv (CSV-quoted, header) and retriever/qas/nq-test.qa.csv."""
    (root / "wikipedia_split").mkdir(parents=True)
    (root / "retriever" / "qas").mkdir(parents=True)
    lines = ["id\ttext\ttitle"] + [f'{pid}\t"{text}"\t{title}' for pid, text, title in PSGS]
    (root / "wikipedia_split" / "psgs_w100.tsv").write_text("\n".join(lines) + "\n")
    (root / "retriever" / "qas" / "nq-test.qa.csv").write_text("".join(f"{q}\t{answers!r}\n" for q, answers in QUESTIONS))
    return root


def test_passages_keep_quoted_text(tmp_path: Path) -> None:
    table = read_passages(write_dpr_dir(tmp_path / "nq") / "wikipedia_split" / "psgs_w100.tsv")
    assert table.column_names == ["_id", "title", "text"] and table.num_rows == len(PSGS)
    assert table.column("text")[0].as_py() == 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.'
    assert table.column("title")[3].as_py() == "Hamlet"


def test_question_files_csv_json_and_jsonl(tmp_path: Path) -> None:
    root = write_dpr_dir(tmp_path / "nq")
    questions, answers = read_qa_file(root / "retriever" / "qas" / "nq-test.qa.csv")
    assert questions["2"] == "who wrote hamlet" and answers["2"] == ["William Shakespeare", "Shakespeare"]
    dpr_json = [
        {"dataset": "nq_dev_psgs_w100", "question": "q a", "answers": ["x"], "positive_ctxs": []},
        {"question": "q b", "answers": ["y", "z"]},
    ]
    (tmp_path / "nq-dev.json").write_text(json.dumps(dpr_json))
    assert read_qa_file(tmp_path / "nq-dev.json") == ({"0": "q a", "1": "q b"}, {"0": ["x"], "1": ["y", "z"]})
    (tmp_path / "nq-open.jsonl").write_text('{"question": "q c", "answer": ["w"], "id": "n7"}\n\n{"question": "q d", "answer": "v"}\n')
    assert read_qa_file(tmp_path / "nq-open.jsonl") == ({"n7": "q c", "1": "q d"}, {"n7": ["w"], "1": ["v"]})


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("nq-test.qa.csv", "who\t['a']\nwhat\t[unquoted]\n", "line 2: field 'answers' is not a Python list literal"),
        ("nq-test.qa.csv", "who\t['a']\tthird\n", "line 1: expected 2 tab-separated fields"),
        ("nq-test.qa.csv", "who\t[]\n", "line 1: field 'answers' is empty"),
        ("nq-test.jsonl", '{"question": "q", "answers": ["a"]}\n{"question": "q"}\n', "line 2: missing field 'answers'"),
        ("nq-test.json", '[{"question": "q", "answers": [1]}]', "record 0: field 'answers' must be a list of strings"),
    ],
)
def test_question_file_errors_name_file_and_line(tmp_path: Path, filename: str, content: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(DatasetError) as err:
        read_qa_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_passage_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "psgs_w100.tsv"
    path.write_text("id\ttext\ttitle\n1\tfine\tT\n2\tmissing title\n")
    with pytest.raises(DatasetError, match=r"psgs_w100.tsv, line 3: expected 3 tab-separated fields"):
        read_passages(path)
    path.write_text("id\ttext\ttitle\n1\tone\tT\n1\ttwo\tT\n")
    with pytest.raises(DatasetError, match=r"data row 2: duplicate passage id '1'"):
        read_passages(path)


def test_load_nq_finds_the_split_files_and_explicit_paths_win(tmp_path: Path) -> None:
    root = write_dpr_dir(tmp_path / "nq")
    dataset = load_nq(root, "test")
    assert dataset.name == "nq" and dataset.num_docs == len(PSGS) and len(dataset.questions) == len(QUESTIONS)
    assert dataset.passage_text()["2"].startswith("The Eiffel Tower") and "Eiffel Tower" in dataset.passage_text(include_title=True)["2"]
    with pytest.raises(DatasetError, match="question files for split 'dev'"):
        load_nq(root, "dev")
    other = tmp_path / "mine.jsonl"
    other.write_text('{"question": "who wrote hamlet", "answers": ["Shakespeare"]}\n')
    assert load_nq(root, "dev", questions=str(other)).questions == {"0": "who wrote hamlet"}


def test_config_defaults_follow_the_suite() -> None:
    config = EvaluateConfig(suite="nq")
    assert config.metrics == ["accuracy@1", "accuracy@5", "accuracy@20", "accuracy@100"] and config.top_k == 100
    assert EvaluateConfig().metrics == ["ndcg@10", "recall@100", "mrr@10", "map@100"] and EvaluateConfig().top_k == 1000
    with pytest.raises(ConfigError, match="unknown NQ metric 'ndcg@10'"):
        load_config(EvaluateConfig, None, ["suite=nq", "metrics=[ndcg@10]"])
    with pytest.raises(ConfigError, match="accuracy@100 needs top_k >= 100"):
        load_config(EvaluateConfig, None, ["suite=nq", "top_k=20"])
    assert EvaluateConfig(suite="nq").with_overrides(split="dev").metrics == config.metrics  # survives a round trip


# --- the command a user runs -------------------------------------------------------------


def test_cli_nq_suite_with_bm25(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_dpr_dir(tmp_path / "nq")
    code = main(["evaluate", "--suite", "nq", "--model", "bm25", "--dataset", str(root), "--metrics", "accuracy@1,accuracy@5"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Four questions share their key words with the answer passage; Canberra is in no passage.
    assert line["accuracy@1"] == pytest.approx(0.8) and line["accuracy@5"] == pytest.approx(0.8)
    assert line["suite"] == "nq" and line["num_queries"] == 5 and line["run_id"]
    assert (tmp_path / "registry.parquet").is_file()  # default registry, pointed into tmp by the fixture


@pytest.mark.slow  # builds a tiny BERT and loads transformers (~5-10 s alone, more on a busy machine)
def test_dense_nq_accuracy_at_full_depth_is_the_share_of_answerable_questions(tmp_path: Path) -> None:
    # With every passage retrieved, accuracy@k depends only on the answers, whatever the (random) encoder does.
    from conftest import build_tiny_bert

    root = write_dpr_dir(tmp_path / "nq")
    tiny_bert = build_tiny_bert(tmp_path / "bert", [text for _, text, _ in PSGS] + [q for q, _ in QUESTIONS], vocab_size=300)
    config = EvaluateConfig(suite="nq", metrics=["accuracy@1", "accuracy@6"], top_k=6, encoder={"show_progress": False})
    result = evaluate(config, Target(model=str(tiny_bert), dataset=str(root)))
    assert result["accuracy@6"] == pytest.approx(4 / 5)
    assert 0 <= result["accuracy@1"] <= result["accuracy@6"]
    assert all(len(hits) == len(PSGS) for hits in result["run"].values())


def test_nfd_answer_matches_precomposed_passage_in_the_file_pipeline(tmp_path: Path) -> None:
    root = tmp_path / "nq"
    root.mkdir()
    (root / "psgs_w100.tsv").write_text("id\ttext\ttitle\n1\tSong by Beyonc\u00e9 and Jay-Z\tSong\n2\tunrelated\tX\n")
    decomposed = unicodedata.normalize("NFD", "Beyoncé")
    (root / "nq-test.qa.csv").write_text(f"who sang it\t{[decomposed]!r}\n")
    means, _ = score_answers({"0": {"1": 1.0}}, load_nq(root).answers, load_nq(root).passage_text(), ["accuracy@1"])
    assert means["accuracy@1"] == 1.0


def test_a_stray_quote_never_merges_passages(tmp_path: Path) -> None:
    path = tmp_path / "psgs_w100.tsv"
    path.write_text(
        'id\ttext\ttitle\n1\t"5\'11"" tall, she said ""hi"""\tA\n2\t"an unclosed quote starts this\tB\n3\tplain\tC\n4\tlast\tD\n'
    )
    table = read_passages(path)
    assert table.column("_id").to_pylist() == ["1", "2", "3", "4"]  # nothing swallowed after the stray quote
    assert table.column("text").to_pylist() == ['5\'11" tall, she said "hi"', '"an unclosed quote starts this', "plain", "last"]
