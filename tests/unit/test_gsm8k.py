"""GSM8K's answer parsing and metric, on the official grader's cases and free-form answers."""

import json

import dspy
import pytest

from bt_ray.config import TaskConfig
from bt_ray.tasks import gsm8k


@pytest.mark.parametrize("text,value", [
    # the official grader (grade-school-math dataset.py): the number after '####', commas removed
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
    ("#### 1,234", 1234),
    ("#### -3", -3),
    ("#### 0.5", 0.5),
    # free-form answers from a model
    ("72", 72), ("$1,234.50", 1234.5), ("€57", 57), ("18.00", 18), (".5", 0.5), ("−4", -4),
    ("18 dollars", 18), ("The answer is 18 dollars (3 x 6).", 18), ("3 x 6 = 18", 18),
    ("5 + 7 = 12 apples, so 12", 12), ("1,000,000 people", 1_000_000),
])
def test_parse_number(text, value):
    assert gsm8k.parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "no idea", "####"])
def test_parse_number_none(text):
    assert gsm8k.parse_number(text) is None


def test_metric():
    gold = dspy.Example(question="q", answer="1234").with_inputs("question")
    assert gsm8k.metric(gold, dspy.Prediction(answer="$1,234.00"))
    assert gsm8k.metric(gold, dspy.Prediction(answer="1234 dollars in total"))
    assert not gsm8k.metric(gold, dspy.Prediction(answer="1235"))
    assert not gsm8k.metric(gold, dspy.Prediction(answer="unknown"))
    assert not gsm8k.metric(gold, dspy.Prediction(reasoning="no answer field"))


def test_official_row_and_real_files(tmp_path):
    row = {"question": "How many?", "answer": "2 + 3 = 5\n#### 1,005"}
    assert gsm8k.parse_official(row) == {"question": "How many?", "gold_reasoning": "2 + 3 = 5", "answer": "1005"}
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name, n in (("train.jsonl", 30), ("test.jsonl", 12)):
        lines = [json.dumps({"question": f"{name} q{i}?", "answer": f"r\n#### {i}"}) for i in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n")
    config = TaskConfig(name="gsm8k", data_dir=str(tmp_path), train_size=20, dev_size=10)
    splits = gsm8k.load_splits(config, seed=0)  # source=auto finds the files
    assert not splits.offline and str(folder) in splits.source
    assert splits.sizes() == {"train": 20, "dev": 10, "test": 12}  # test: the whole official test file
    assert all(ex.question.startswith("train.jsonl") for ex in splits.train + splits.dev)


def test_missing_real_data_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"bt-ray data download gsm8k --to {tmp_path}"):
        gsm8k.load_splits(TaskConfig(name="gsm8k", source="real", data_dir=str(tmp_path)), seed=0)
