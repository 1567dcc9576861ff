"""Downloaders: fetch, row-count verification and storage, on small local files served as file:// URLs."""

import io
import json
import tarfile
from dataclasses import replace

import pytest

from bt_ray.cli import main
from bt_ray.errors import DataError
from bt_ray.tasks import sources
from bt_ray.tasks.sources import DATASETS, Dataset, download, require, verify


def _gsm_rows(n):
    return "".join(json.dumps({"question": f"q{i}?", "answer": f"1 + {i} = {i + 1}\n#### {i + 1}"}) + "\n"
                   for i in range(n))


@pytest.fixture
def small_gsm8k(tmp_path, monkeypatch):
    """GSM8K's two files, 5 and 3 rows, served from disk; the expected counts set to match."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "train.jsonl").write_text(_gsm_rows(5))
    (served / "test.jsonl").write_text(_gsm_rows(3))
    train, test = DATASETS["gsm8k"].files
    files = (replace(train, url=(served / "train.jsonl").as_uri(), rows=5),
             replace(test, url=(served / "test.jsonl").as_uri(), rows=3))
    monkeypatch.setitem(DATASETS, "gsm8k", Dataset("gsm8k", files, DATASETS["gsm8k"].licence))
    return served


def test_official_counts_are_the_published_ones():
    counts = {f.name: f.rows for d in DATASETS.values() for f in d.files}
    assert counts == {"train.jsonl": 7473, "test.jsonl": 1319, "hotpot_train_v1.1.json": 90447,
                      "hotpot_dev_fullwiki_v1.json": 7405, "wiki.abstracts.2017.jsonl": 5233330}


def test_download_verifies_and_stores_where_the_loader_finds_it(small_gsm8k, tmp_path):
    data = tmp_path / "data"
    paths = download("gsm8k", data)
    assert [p.name for p in paths] == ["train.jsonl", "test.jsonl"]
    assert require(data, "gsm8k")["test.jsonl"].read_text() == _gsm_rows(3)
    assert not list((data / "gsm8k").glob("*.part"))
    download("gsm8k", data)  # already there: verified again, not fetched


def test_a_short_file_is_refused_and_not_kept(small_gsm8k, tmp_path):
    (small_gsm8k / "test.jsonl").write_text(_gsm_rows(2))
    with pytest.raises(DataError, match="2 rows, but the official test.jsonl has 3"):
        download("gsm8k", tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data" / "gsm8k").iterdir()) == ["train.jsonl"]


def test_a_malformed_row_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(_gsm_rows(2) + json.dumps({"question": "q", "answer": "no final marker"}) + "\n")
    with pytest.raises(DataError, match="row 3 is not a train.jsonl row"):
        verify(path, replace(DATASETS["gsm8k"].files[0], rows=3))


def test_hotpotqa_json_array(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a", "level": "hard"}] * 4))
    assert verify(path, replace(DATASETS["hotpotqa"].files[1], rows=4)) == 4
    with pytest.raises(DataError, match="4 rows, but the official hotpot_dev_fullwiki_v1.json has 7405"):
        verify(path, DATASETS["hotpotqa"].files[1])


def test_abstracts_come_out_of_their_archive(tmp_path, monkeypatch):
    lines = "".join(json.dumps({"title": f"T{i}", "text": [f"Sentence {i}."]}) + "\n" for i in range(3))
    archive = tmp_path / "wiki.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("wiki.abstracts.2017/wiki.abstracts.2017.jsonl")
        info.size = len(lines.encode())
        tar.addfile(info, io.BytesIO(lines.encode()))
    (file,) = DATASETS["wiki-abstracts"].files
    monkeypatch.setitem(DATASETS, "wiki-abstracts",
                        Dataset("wiki-abstracts", (replace(file, url=archive.as_uri(), rows=3),), "CC BY-SA"))
    (path,) = download("wiki-abstracts", tmp_path / "data")
    assert path.read_text() == lines
    assert sorted(p.name for p in path.parent.iterdir()) == ["wiki.abstracts.2017.jsonl"]


def test_unreachable_source_says_what_to_do(tmp_path, monkeypatch):
    train, test = DATASETS["gsm8k"].files
    gone = (replace(train, url=(tmp_path / "nowhere.jsonl").as_uri()), test)
    monkeypatch.setitem(DATASETS, "gsm8k", Dataset("gsm8k", gone, ""))
    with pytest.raises(DataError, match="could not download .*nowhere.jsonl.*download it by hand"):
        download("gsm8k", tmp_path / "data")


def test_missing_data_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run `bt-ray data download hotpotqa --to {tmp_path}`"):
        require(tmp_path, "hotpotqa")
    assert not sources.is_downloaded(tmp_path, "hotpotqa")


def test_cli_data_download(small_gsm8k, tmp_path, capsys):
    assert main(["data", "download", "gsm8k", "--to", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "gsm8k (MIT" in out and "task.data_dir=" in out
    (small_gsm8k / "train.jsonl").write_text(_gsm_rows(1))
    assert main(["data", "download", "gsm8k", "--to", str(tmp_path / "e")]) == 1  # a failed download exits 1
