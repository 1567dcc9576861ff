"""Retrieval: BM25 over a passages file, and the ColBERTv2 client against a fake wiki17 server (labelled)."""

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from bt_ray.errors import RetrievalError
from bt_ray.retrieval import open_retriever
from bt_ray.retrieval.bm25 import BM25Retriever, read_passages

ROWS = [
    {"title": "Stanley Kubrick", "text": ["Stanley Kubrick was an American filmmaker.", "He was a photographer."]},
    {"title": "2001: A Space Odyssey", "text": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick."},
    {"title": "Eiffel Tower", "text": ["The Eiffel Tower is a lattice tower in Paris."]},
    {"title": "Gustave Eiffel", "text": ["Gustave Eiffel was a French civil engineer."]},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_bm25_over_a_wiki17_style_file(corpus):
    search = open_retriever("bm25", corpus=str(corpus))
    assert read_passages(corpus)[0] == "Stanley Kubrick | Stanley Kubrick was an American filmmaker. He was a photographer."
    top = search("who was the engineer Gustave Eiffel", k=2)
    assert top[0].startswith("Gustave Eiffel | ") and len(top) == 2
    assert search("Kubrick film 1968", k=1) == [read_passages(corpus)[1]]
    assert len(search("Paris", k=10)) == len(ROWS)  # k is capped at the corpus size
    assert search("the of and", k=3) == []  # stopwords only


def test_copies_of_a_program_share_the_index(corpus):
    search = BM25Retriever.from_file(corpus)
    assert copy.deepcopy({"search": search})["search"] is search


def test_bad_passages_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a passage line"):
        read_passages(bad)
    with pytest.raises(FileNotFoundError):
        read_passages(tmp_path / "missing.jsonl")


class FakeWiki17Server(BaseHTTPRequestHandler):
    """Fake (labelled): answers like the public wiki17 abstracts ColBERTv2 server, over ROWS."""

    def do_GET(self):  # noqa: N802
        query = parse_qs(urlparse(self.path).query)
        k = int(query["k"][0])
        words = set(query["query"][0].lower().split())
        ranked = sorted(ROWS, key=lambda r: -len(words & set(json.dumps(r).lower().replace('"', " ").split())))
        topk = [{"text": f"{r['title']} | {' '.join(r['text']) if isinstance(r['text'], list) else r['text']}",
                 "pid": i, "rank": i + 1, "score": 1.0 / (i + 1)} for i, r in enumerate(ranked[:k])]
        body = json.dumps({"query": query["query"][0], "topk": topk}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), FakeWiki17Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/wiki17_abstracts"
    httpd.shutdown()


def test_colbertv2_client(server):
    search = open_retriever("colbertv2", url=server)
    top = search("gustave eiffel engineer", k=2)
    assert len(top) == 2 and top[0] == "Gustave Eiffel | Gustave Eiffel was a French civil engineer."
    assert copy.deepcopy(search) is search


def test_colbertv2_down_stops_the_run():
    search = open_retriever("colbertv2", url="http://127.0.0.1:9/nothing-listens-here")
    with pytest.raises(RetrievalError, match="ColBERTv2 endpoint http://127.0.0.1:9/nothing-listens-here failed"):
        search("a question that is not cached", k=3)


def test_open_retriever_needs_its_setting():
    with pytest.raises(ValueError, match="task.corpus"):
        open_retriever("bm25")
    with pytest.raises(ValueError, match="task.retriever_url"):
        open_retriever("colbertv2")
