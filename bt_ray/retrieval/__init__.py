"""Retrieval for multi-hop programs: one small interface, two backends.

    search = open_retriever(task_config)      # bm25 over a passages file, or a ColBERTv2 endpoint
    passages = search("who directed 2001: A Space Odyssey", k=3)   # list of "Title | text" strings

A retriever is read-only and shared: copying a program (Π's candidates, Θ's
tuned copy) keeps the same index instead of copying it.
"""

from __future__ import annotations

from typing import Protocol


class Retriever(Protocol):
    def __call__(self, query: str, k: int) -> list[str]:
        """The top-k passages for `query`, best first, each as 'Title | text'."""
        ...


def open_retriever(kind: str, *, corpus: str | None = None, url: str | None = None) -> Retriever:
    """`kind` 'bm25' needs a passages file (`corpus`); 'colbertv2' needs the endpoint's `url`."""
    if kind == "bm25":
        from bt_ray.retrieval.bm25 import BM25Retriever

        if not corpus:
            raise ValueError("the bm25 retriever needs a passages file (task.corpus)")
        return BM25Retriever.from_file(corpus)
    if kind == "colbertv2":
        from bt_ray.retrieval.colbert import ColBERTv2Retriever

        if not url:
            raise ValueError("the colbertv2 retriever needs an endpoint (task.retriever_url)")
        return ColBERTv2Retriever(url)
    raise ValueError(f"unknown retriever {kind!r}; use bm25 or colbertv2")
