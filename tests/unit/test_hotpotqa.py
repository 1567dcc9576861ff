"""HotPotQA: the metric's normalization, the offline fixture, and Θ's per-predictor data on the real program.

The model is a fake (FakeSession: canned ChatAdapter answers, labelled); the program, its BM25
retriever over the shipped Wikipedia paragraphs, DSPy's adapter and Θ's trace formatting are real.
"""

import json
import re

import dspy
import pytest

from bt_ray.config import TaskConfig, TrainConfig
from bt_ray.phases.finetune import collect_examples
from bt_ray.tasks import hotpotqa

from .fakes import FakeSession

OFFLINE = TaskConfig(name="hotpotqa", source="offline")


@pytest.mark.parametrize("gold,guess,match", [
    # SQuAD / HotPotQA official normalize_answer: lowercase, no punctuation, no articles, single spaces
    ("Statue of Liberty", "the statue of liberty", True),
    ("Avon", "Avon.", True),
    ("The Dark Crystal", "Dark Crystal", True),
    ("an apple", "Apple", True),
    ("Redmond, Washington", "Redmond Washington", True),
    ("2,100", "2100", True),
    ("French and Swiss", "  french   and swiss ", True),
    ("yes", "Yes!", True),
    ("Catalan Modernisme", "Catalan Modernisme style", False),
    ("1989", "1988", False),
    ("Redmond, Washington", "Redmond", False),
])
def test_exact_match_normalization(gold, guess, match):
    example = dspy.Example(question="q", answer=gold).with_inputs("question")
    assert hotpotqa.metric(example, dspy.Prediction(answer=guess)) is match


@pytest.fixture(scope="module")
def passages():
    return {p.split(" | ", 1)[0]: p for p in hotpotqa.offline_passages()}


def _norm(text):
    return f" {dspy.evaluate.normalize_text(text)} "


def test_offline_questions_need_both_hops(passages):
    rows = [json.loads(line) for line in hotpotqa.OFFLINE_QUESTIONS.read_text().splitlines()]
    assert len(rows) == 38 and len({r["question"] for r in rows}) == 38
    for row in rows:
        first, second = row["gold_titles"]
        assert first in passages and second in passages, row
        answer = _norm(row["answer"])
        assert answer in _norm(passages[second]), row  # the second hop has the answer ...
        assert answer not in _norm(passages[first]), row  # ... the first does not, it names the bridge
        assert dspy.evaluate.normalize_text(second).split()[-1] in _norm(passages[first]).split(), row


def test_bm25_finds_each_gold_article_from_its_title(passages):
    search = hotpotqa.retriever_for(OFFLINE)
    assert len(passages) > 10_000 and search is hotpotqa.retriever_for(OFFLINE)  # one shared index
    for row in map(json.loads, hotpotqa.OFFLINE_QUESTIONS.read_text().splitlines()):
        for title in row["gold_titles"]:
            assert passages[title] in search(title, k=3), title


EMPTY = ("", "[]", "N/A")  # how DSPy's ChatAdapter shows the first hop's empty context


def _field(message, name):
    found = re.search(rf"\[\[ ## {name} ## \]\]\n(.*?)(?:\n\n(?:\[\[|Respond with)|\Z)", message, re.S)
    return found.group(1).strip() if found else ""


def oracle(rows):
    """A fake model: searches the gold titles hop by hop, answers only if both hops' passages were retrieved."""
    by_question = {r["question"]: r for r in rows}

    def respond(request):
        system, user = request.messages[0]["content"], request.messages[-1]["content"]
        row = by_question[_field(user, "question")]
        if "search_query" in system:
            hop = 0 if _field(user, "context") in EMPTY else 1
            return f"[[ ## reasoning ## ]]\nhop {hop}\n\n[[ ## search_query ## ]]\n{row['gold_titles'][hop]}\n\n"
        context = _field(user, "context")
        found = _norm(row["answer"]) in _norm(context) and f"{row['gold_titles'][0]} |" in context
        return f"[[ ## reasoning ## ]]\nread\n\n[[ ## answer ## ]]\n{row['answer'] if found else 'unknown'}\n\n"

    return respond


def _theta_data(program, trainset):
    session = FakeSession(oracle([{"question": ex.question, "answer": ex.answer, "gold_titles": ex.gold_titles}
                                  for ex in trainset]))
    program.set_lm(session.lm(None))
    return collect_examples(program, trainset, hotpotqa.metric, adapter=session.adapter,
                            config=TrainConfig(metric_threshold=1.0), max_inflight=8)


def test_theta_assigns_each_predictor_its_own_calls():
    trainset = hotpotqa.load_splits(OFFLINE, seed=0).train
    examples, stats = _theta_data(hotpotqa.build_program(OFFLINE), trainset)
    n = len(trainset)
    assert stats["traces_kept"] == n  # two real BM25 hops found every answer
    assert stats["per_predictor"] == {"generate_query[0].predict": n, "generate_query[1].predict": n,
                                      "generate_answer.predict": n}
    outputs = [messages[-1]["content"] for messages in examples]
    assert sum("[[ ## search_query ## ]]" in o for o in outputs) == 2 * n
    assert sum("[[ ## answer ## ]]" in o for o in outputs) == n


def test_theta_with_one_predictor_looped_over_hops():
    """Each hop calls the same predictor object: its two calls per trace are both its training data."""
    trainset = hotpotqa.load_splits(OFFLINE, seed=0).train[:6]
    program = hotpotqa.build_program(OFFLINE)
    shared = program.generate_query[0]
    program.generate_query = [shared, shared]
    assert [name for name, _ in program.named_predictors()] == ["generate_query[0].predict",
                                                                "generate_answer.predict"]
    examples, stats = _theta_data(program, trainset)
    assert stats["per_predictor"] == {"generate_query[0].predict": 12, "generate_answer.predict": 6}
    queries = [m for m in examples if "[[ ## search_query ## ]]" in m[-1]["content"]]
    first_hop = [m for m in queries if _field(m[-2]["content"], "context") in EMPTY]
    assert len(first_hop) == 6  # one empty-context call and one with hop 1's passages, per trace
    for messages in queries:
        assert messages[0]["content"] == queries[0][0]["content"]  # the same predictor's system prompt


def test_real_splits_from_official_files(tmp_path):
    folder = tmp_path / "hotpotqa"
    folder.mkdir()
    train = [{"question": f"t{i}?", "answer": "a", "level": "hard" if i % 2 else "easy",
              "supporting_facts": [["A", 0], ["B", 1]]} for i in range(40)]
    dev = [{"question": f"d{i}?", "answer": "b", "level": "hard", "supporting_facts": [["C", 0]]} for i in range(9)]
    (folder / "hotpot_train_v1.1.json").write_text(json.dumps(train))
    (folder / "hotpot_dev_fullwiki_v1.json").write_text(json.dumps(dev))
    config = TaskConfig(name="hotpotqa", data_dir=str(tmp_path), corpus=str(tmp_path / "passages.jsonl"),
                        train_size=12, dev_size=8, test_size=5)
    splits = hotpotqa.load_splits(config, seed=0)
    assert not splits.offline and splits.sizes() == {"train": 12, "dev": 8, "test": 5}
    assert all(int(ex.question[1:-1]) % 2 for ex in splits.train + splits.dev)  # hard questions only
    assert splits.test[0].gold_titles == ["C"]


def test_real_questions_without_a_corpus_say_what_to_download(tmp_path):
    folder = tmp_path / "hotpotqa"
    folder.mkdir()
    for name in ("hotpot_train_v1.1.json", "hotpot_dev_fullwiki_v1.json"):
        (folder / name).write_text(json.dumps([{"question": "q", "answer": "a", "level": "hard"}] * 4))
    config = TaskConfig(name="hotpotqa", data_dir=str(tmp_path), train_size=2, dev_size=1, test_size=1)
    with pytest.raises(FileNotFoundError, match="bt-ray data download wiki-abstracts"):
        hotpotqa.load_splits(config, seed=0)
