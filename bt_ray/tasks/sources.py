"""The official public files of GSM8K, HotPotQA and the wiki17 abstracts: download, verify, find.

    bt-ray data download gsm8k --to ~/.cache/bt-ray/data
    bt-ray data download hotpotqa
    bt-ray data download wiki-abstracts          (≈500 MB compressed; for the local BM25 index)

Each file is fetched to `<name>.part`, its rows are counted and checked against
the official count, and only then renamed into place, so a loader never sees a
half-written or truncated file. Loaders call `require` to find the files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bt_ray.errors import DataError

logger = logging.getLogger(__name__)


def _gsm8k_row(row: dict) -> None:
    if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
        raise ValueError("expected a question and an answer ending in '#### <number>'")


def _hotpotqa_row(row: dict) -> None:
    if not all(isinstance(row.get(k), str) for k in ("question", "answer", "level")):
        raise ValueError("expected question, answer and level strings")


def _abstract_row(row: dict) -> None:
    if not isinstance(row.get("title"), str) or not isinstance(row.get("text"), (list, str)):
        raise ValueError("expected a title and a text (sentences)")


@dataclass(frozen=True)
class DataFile:
    url: str
    name: str  # stored as <data_dir>/<dataset>/<name>
    rows: int  # the official row count
    layout: str  # "jsonl" (one row a line) or "json" (one array)
    check_row: Callable[[dict], None]
    archive_member: str | None = None  # the file inside a .tar.gz download


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[DataFile, ...]
    licence: str


DATASETS = {
    "gsm8k": Dataset("gsm8k", (
        DataFile("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
                 "train.jsonl", "train.jsonl", 7473, "jsonl", _gsm8k_row),
        DataFile("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
                 "test.jsonl", "test.jsonl", 1319, "jsonl", _gsm8k_row),
    ), "MIT (Cobbe et al., 2021)"),
    "hotpotqa": Dataset("hotpotqa", (
        DataFile("http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_train_v1.1.json", "hotpot_train_v1.1.json",
                 90447, "json", _hotpotqa_row),
        DataFile("http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_fullwiki_v1.json",
                 "hotpot_dev_fullwiki_v1.json", 7405, "json", _hotpotqa_row),
    ), "CC BY-SA 4.0 (Yang et al., 2018)"),
    "wiki-abstracts": Dataset("wiki-abstracts", (
        DataFile("https://huggingface.co/dspy/cache/resolve/main/wiki.abstracts.2017.tar.gz",
                 "wiki.abstracts.2017.jsonl", 5233330, "jsonl", _abstract_row,
                 archive_member="wiki.abstracts.2017.jsonl"),
    ), "CC BY-SA (Wikipedia abstracts, 2017 dump, as processed for HotPotQA)"),
}


def path_of(data_dir: str | Path, dataset: str, file: str) -> Path:
    return Path(data_dir).expanduser() / dataset / file


def is_downloaded(data_dir: str | Path, dataset: str) -> bool:
    return all(path_of(data_dir, dataset, f.name).is_file() for f in DATASETS[dataset].files)


def require(data_dir: str | Path, dataset: str) -> dict[str, Path]:
    """The dataset's files by name; FileNotFoundError naming the download command when one is missing."""
    paths = {f.name: path_of(data_dir, dataset, f.name) for f in DATASETS[dataset].files}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset} is not downloaded (missing {', '.join(missing)}); run `bt-ray data download {dataset} "
            f"--to {data_dir}` (or point task.data_dir at where it is, or use task.source=offline)")
    return paths


def read_rows(path: Path, layout: str) -> list[dict]:
    if layout == "json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        return rows
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def verify(path: Path, file: DataFile) -> int:
    """Count and check the rows of a downloaded file; DataError unless it has exactly the official count."""
    if file.layout == "jsonl":  # streamed: the abstracts are too large to hold as dicts
        count = 0
        with path.open() as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    _check(path, number, file, json.loads(line))
                    count += 1
    else:
        rows = read_rows(path, file.layout)
        for number, row in enumerate(rows, start=1):
            _check(path, number, file, row)
        count = len(rows)
    if count != file.rows:
        raise DataError(f"{path}: {count} rows, but the official {file.name} has {file.rows}; the download is "
                        f"incomplete or a different version; delete it and download again")
    return count


def _check(path: Path, number: int, file: DataFile, row: object) -> None:
    try:
        if not isinstance(row, dict):
            raise ValueError(f"expected an object, got {type(row).__name__}")
        file.check_row(row)
    except ValueError as exc:
        raise DataError(f"{path}: row {number} is not a {file.name} row: {exc}") from None


def download(dataset: str, to: str | Path) -> list[Path]:
    """Fetch, verify and store every file of `dataset` under `to/<dataset>/`; files already there are verified."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = Path(to).expanduser() / dataset
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    for file in DATASETS[dataset].files:
        target = folder / file.name
        if not target.is_file():
            part = folder / (file.name + ".part")
            _fetch(file, part)
            try:
                verify(part, file)
            except (DataError, json.JSONDecodeError) as exc:
                part.unlink(missing_ok=True)
                raise DataError(f"{file.url}: {exc}") from None
            part.rename(target)
        else:
            verify(target, file)
        logger.info("%s: %s verified (%d rows)", dataset, target, file.rows)
        done.append(target)
    return done


def _fetch(file: DataFile, part: Path) -> None:
    logger.info("downloading %s", file.url)
    download_to = part.with_name(part.name + ".download") if file.archive_member else part
    try:
        with urllib.request.urlopen(file.url, timeout=60) as response, download_to.open("wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:
        download_to.unlink(missing_ok=True)
        raise DataError(f"could not download {file.url}: {exc}; check the network, or download it by hand "
                        f"into {part.parent} as {file.name}") from None
    if file.archive_member:
        try:
            with tarfile.open(download_to, "r:gz") as tar:
                member = next((m for m in tar.getmembers() if Path(m.name).name == file.archive_member), None)
                if member is None:
                    raise DataError(f"{file.url}: the archive has no {file.archive_member}")
                with tar.extractfile(member) as src, part.open("wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
        finally:
            download_to.unlink(missing_ok=True)


def use_real(config, dataset: str) -> bool:
    """task.source: real -> yes (missing files fail in `require`); offline -> no; auto -> if downloaded."""
    if config.source == "auto":
        return is_downloaded(config.data_dir, dataset)
    return config.source == "real"
