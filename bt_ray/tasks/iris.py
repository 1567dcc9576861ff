"""Iris (Fisher, 1988): the paper's single-module chain-of-thought classifier.

Data comes from scikit-learn (no download). Following the paper, the 150 flowers
are re-split into train / dev / test of 50 each, stratified by species and
shuffled by the run's seed. The program is Snippet 3 of the paper.
"""

from __future__ import annotations

import dspy

from bt_ray.tasks import Splits, Task

SPECIES = ("setosa", "versicolour", "virginica")  # the spelling the program's answer field asks for
_ALIASES = {"versicolor": "versicolour"}


class IrisSignature(dspy.Signature):
    "Given the petal and sepal dimensions in cm, predict the iris species."

    petal_length = dspy.InputField()
    petal_width = dspy.InputField()
    sepal_length = dspy.InputField()
    sepal_width = dspy.InputField()
    answer = dspy.OutputField(desc="setosa, versicolour, or virginica")


class IrisProgram(dspy.Module):
    def __init__(self):
        super().__init__()
        self.pred = dspy.ChainOfThought(IrisSignature)

    def forward(self, petal_length, petal_width, sepal_length, sepal_width):
        return self.pred(petal_length=petal_length, petal_width=petal_width,
                         sepal_length=sepal_length, sepal_width=sepal_width)


def normalize_species(text: str) -> str:
    word = str(text).strip().lower().strip(".!'\"` ").removeprefix("iris ").strip()
    return _ALIASES.get(word, word)


def metric(example, prediction, trace=None) -> bool:
    """Exact match on the species name (case and surrounding punctuation ignored)."""
    return normalize_species(getattr(prediction, "answer", "")) == normalize_species(example.answer)


def load_splits(config, seed: int) -> Splits:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    data = load_iris()
    # sklearn's columns: sepal length, sepal width, petal length, petal width (cm)
    rows = [dict(sepal_length=f"{x[0]:.1f}", sepal_width=f"{x[1]:.1f}", petal_length=f"{x[2]:.1f}",
                 petal_width=f"{x[3]:.1f}", answer=SPECIES[y]) for x, y in zip(data.data, data.target)]
    labels = [r["answer"] for r in rows]
    sizes = [config.train_size or 50, config.dev_size or 50, config.test_size or 50]
    if sum(sizes) > len(rows):
        raise ValueError(f"task.train_size + dev_size + test_size = {sum(sizes)} but Iris has {len(rows)} "
                         f"examples; keep the sum <= {len(rows)}")
    train, rest, _, rest_labels = train_test_split(rows, labels, train_size=sizes[0], stratify=labels,
                                                   random_state=seed)
    dev, test = train_test_split(rest, train_size=sizes[1], test_size=sizes[2], stratify=rest_labels,
                                 random_state=seed + 1)
    fields = ("petal_length", "petal_width", "sepal_length", "sepal_width")
    as_examples = lambda part: [dspy.Example(**r).with_inputs(*fields) for r in part]  # noqa: E731
    return Splits(as_examples(train), as_examples(dev), as_examples(test), source="scikit-learn load_iris()")


TASK = Task(name="iris", build_program=IrisProgram, load_splits=load_splits, metric=metric)
