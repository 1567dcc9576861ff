"""Client for a ColBERTv2 search endpoint in the format of the public wiki17 abstracts server.

    GET <url>?query=...&k=3  ->  {"topk": [{"text": "Title | abstract", "pid": ..., "score": ...}, ...]}

The request itself is DSPy's `dspy.ColBERTv2` (with DSPy's request cache); this
class only gives it the retriever interface and a clear error.
"""

from __future__ import annotations

import dspy

from bt_ray.errors import RetrievalError


class ColBERTv2Retriever:
    def __init__(self, url: str, post_requests: bool = False):
        self.url = url
        self._client = dspy.ColBERTv2(url=url, post_requests=post_requests)

    def __call__(self, query: str, k: int) -> list[str]:
        try:
            return list(self._client(query, k=k, simplify=True))
        except Exception as exc:
            raise RetrievalError(f"ColBERTv2 endpoint {self.url} failed for query {query!r}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def __deepcopy__(self, memo: dict) -> "ColBERTv2Retriever":
        return self
