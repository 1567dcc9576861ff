"""A local BM25 index over a passages file (bm25s, English stemming and stopwords).

Passages files are JSON lines in the wiki17 abstracts format, one passage a line:
    {"title": "Stanley Kubrick", "text": ["Stanley Kubrick was ...", "..."]}   (text: sentences or a string)
They are indexed as "Title | text", the form the ColBERTv2 wiki17 server returns.
A large corpus's index is saved beside it (`<file>.bm25s/`) and reloaded next time.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

SAVE_ABOVE = 100_000  # passages; smaller corpora index in seconds and are not saved


def passage(title: str, text: str | list[str]) -> str:
    body = " ".join(text) if isinstance(text, list) else str(text)
    return f"{title} | {body.strip()}"


def read_passages(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"passages file {str(path)!r} does not exist")
    passages = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                passages.append(passage(row["title"], row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a passage line {{\"title\": ..., \"text\": ...}} "
                                 f"({type(exc).__name__}: {exc})") from None
    return passages


class BM25Retriever:
    def __init__(self, passages: Iterable[str], index_dir: str | Path | None = None):
        import bm25s
        import Stemmer

        self.passages = list(passages)
        if not self.passages:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        self._stemmer = Stemmer.Stemmer("english")
        self._lock = threading.Lock()  # the stemmer and bm25s' scorer are not documented as thread-safe
        if index_dir is not None and Path(index_dir, "params.index.json").is_file():
            self._index = bm25s.BM25.load(str(index_dir))
            return
        self._index = bm25s.BM25()
        tokens = bm25s.tokenize(self.passages, stopwords="en", stemmer=self._stemmer, show_progress=False)
        self._index.index(tokens, show_progress=False)
        if index_dir is not None:
            self._index.save(str(index_dir))
            logger.info("saved the BM25 index of %d passages to %s", len(self.passages), index_dir)

    @classmethod
    def from_file(cls, path: str | Path) -> "BM25Retriever":
        passages = read_passages(path)
        index_dir = Path(f"{path}.bm25s") if len(passages) > SAVE_ABOVE else None
        return cls(passages, index_dir)

    def __call__(self, query: str, k: int) -> list[str]:
        import bm25s

        k = min(k, len(self.passages))
        with self._lock:
            tokens = bm25s.tokenize([query], stopwords="en", stemmer=self._stemmer, show_progress=False)
            if not tokens.vocab:  # a query of stopwords only: nothing to match
                return []
            ids, _ = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [self.passages[i] for i in ids[0]]

    def __deepcopy__(self, memo: dict) -> "BM25Retriever":
        return self  # read-only and shared by every copy of a program

    def __len__(self) -> int:
        return len(self.passages)
