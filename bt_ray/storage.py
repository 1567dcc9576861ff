"""Run storage: `output_dir` is a local path, a shared filesystem path, or an object-store URI.

    output_dir: runs                     this machine only: one-node Ray clusters
    output_dir: /mnt/bt-ray/runs         a shared filesystem (NFS, EFS, Filestore) at the same path on every node
    output_dir: s3://bucket/bt-ray/runs  an object store through pyarrow.fs (also gs://, abfs://; file:// in tests)

Adapters and checkpoints must reach every node. With a URI, a run works in a local copy
(~/.cache/bt-ray/runs/<uri>/<name>) that is uploaded after every finished phase and at the end, and
downloaded again on --resume; an adapter handed to a replica or a training worker is the URI of its
uploaded copy, which the receiver downloads to its own cache (`fetch`) before loading. Ray Train writes
its checkpoints to the URI itself. Credentials come from the environment pyarrow reads (AWS_*,
GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), never from a config: a URI with credentials inside
is refused.

On a cluster of several nodes a plain path must be the same directory on every node:
`check_shared` proves it (a marker file written here must be read back on every alive node) before
any model loads, and otherwise fails naming the nodes that cannot see it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from bt_ray.errors import BtRayError, ConfigError

logger = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")  # what pyarrow.fs.FileSystem.from_uri opens
RUN_CACHE = "~/.cache/bt-ray/runs"  # local working copies of runs whose output_dir is a URI
ADAPTER_CACHE = "~/.cache/bt-ray/adapters"  # adapters fetched from a URI, one folder per uploaded version
LOCAL_ONLY = ("cache",)  # a run's DSPy response cache stays on the driver's machine
NODE_LOCAL_ROOTS = ("/tmp", "/dev/shm", "/var/tmp")  # never shared between machines
_SECRET_QUERY = re.compile(r"key|secret|token|password|sig|credential", re.I)
_FIX = ("use a shared filesystem mounted at the same path on every node (NFS, EFS, Filestore; e.g. "
        "output_dir=/mnt/bt-ray/runs) or an object-store URI (output_dir=s3://BUCKET/runs, gs://..., abfs://...)")


class StorageError(BtRayError):
    """Reading or writing run storage failed. Names the URI and the cause."""


def is_uri(path: Any) -> bool:
    return isinstance(path, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def uri_problems(value: str, key: str = "output_dir") -> list[str]:
    """What is wrong with a storage URI (nothing for a plain path): unknown scheme, credentials inside."""
    if not is_uri(value):
        return []
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return [f"{key}: {redact(value)} has scheme {scheme}://, which bt-ray cannot store runs in; use a path, "
                f"or one of {', '.join(s + '://' for s in SCHEMES)}"]
    # abfs://container@account.dfs.core.windows.net names a container that way; a password never belongs there.
    userinfo = parts.username is not None and scheme not in ("abfs", "abfss")
    secrets = [k for k, _ in parse_qsl(parts.query) if _SECRET_QUERY.search(k)]
    if parts.password is not None or userinfo or secrets:
        return [f"{key}: {redact(value)} carries credentials in the URI (they would be saved with the run's config "
                f"and shown in logs); remove them and set them in the environment instead (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY or an instance role for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, "
                f"AZURE_STORAGE_ACCOUNT_KEY or a managed identity for abfs://)"]
    return []


def redact(value: str) -> str:
    """The URI without what could be a secret: the user-info part and the query."""
    parts = urlsplit(value)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}{parts.path}{'?***' if parts.query else ''}"


def local_run_dir(output_dir: str, run_name: str) -> Path:
    """Where a run's files are written on this machine: output_dir/name, or the local copy of a URI's."""
    if not is_uri(output_dir):
        return Path(output_dir).expanduser() / run_name
    parts = urlsplit(output_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts.scheme}_{parts.netloc}{parts.path}".rstrip("/"))
    return Path(RUN_CACHE).expanduser() / slug / run_name


# ---------------------------------------------------------------- a run's copy in an object store


class RunMirror:
    """A run's local working copy and its URI. `push` uploads what changed since the last push."""

    def __init__(self, uri: str, local: Path):
        self.uri, self.local = uri.rstrip("/"), Path(local)
        self.fs, self.root = _filesystem(self.uri)
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded

    def remote(self, local_path: str | Path) -> str:
        rel = Path(local_path).resolve().relative_to(self.local.resolve())
        return self.uri if str(rel) == "." else f"{self.uri}/{rel.as_posix()}"

    def holds_run(self) -> bool:
        return _call(self.uri, lambda: self.fs.get_file_info(f"{self.root}/state.json").is_file)

    def reset_local(self) -> None:
        """Empty the working copy (the URI is the run's truth), keeping the local DSPy cache."""
        if self.local.exists():
            for entry in self.local.iterdir():
                if entry.name not in LOCAL_ONLY:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.local.mkdir(parents=True, exist_ok=True)

    def pull(self) -> int:
        """Download the run from the URI into the working copy; returns the number of files."""
        count = _download(self.fs, self.root, self.local, self.uri)
        for path in self.local.rglob("*"):  # what came from the URI need not go back
            if path.is_file():
                self._sent[path.relative_to(self.local).as_posix()] = _stamp(path)
        return count

    def push(self, under: str | Path | None = None) -> int:
        """Upload new or changed files of the working copy (or of `under`, a folder in it); returns how many."""
        local = self.local.resolve()
        base = Path(under).resolve() if under else local
        sent = 0
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            if rel.split("/", 1)[0] in LOCAL_ONLY or self._sent.get(rel) == _stamp(path):
                continue
            stamp = _stamp(path)
            _upload(self.fs, path, f"{self.root}/{rel}", self.uri)
            self._sent[rel] = stamp
            sent += 1
        if sent:
            logger.info("run storage: %d file(s) uploaded to %s", sent, redact(self.uri))
        return sent


_mirrors: dict[Path, RunMirror] = {}  # local working copy -> its mirror, for the runs of this process


def open_run(output_dir: str, run_dir: Path, resume: bool) -> RunMirror | None:
    """For a URI output_dir: the run's mirror, its working copy made equal to the URI's run. None for a path.

    Refuses to start over a run the URI already holds (as for a local run dir) unless resuming.
    """
    if not is_uri(output_dir):
        return None
    mirror = RunMirror(f"{output_dir.rstrip('/')}/{run_dir.name}", run_dir)
    held = mirror.holds_run()
    if held and not resume:
        raise ConfigError(f"{redact(mirror.uri)} already holds a run; pass --resume to continue it, or choose "
                          f"another name= / output_dir= for a new run")
    mirror.reset_local()
    if held:
        logger.info("run storage: %d file(s) of %s downloaded to %s", mirror.pull(), redact(mirror.uri), run_dir)
    _mirrors[run_dir.resolve()] = mirror
    return mirror


def _mirror_of(path: str | Path) -> RunMirror | None:
    resolved = Path(path).resolve()
    return next((m for root, m in _mirrors.items() if resolved == root or root in resolved.parents), None)


def pull_named(uri: str, names: tuple[str, ...], local: Path) -> int:
    """Download the files under `uri` whose name is one of `names` (e.g. every results.json of a sweep) into
    `local`, keeping their relative paths; returns how many."""
    filesystem, root = _filesystem(uri.rstrip("/"))
    files = [f for f in _listing(filesystem, root, uri) if f.base_name in names]

    def copy() -> int:
        for entry in files:
            dest = local / entry.path[len(root):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(entry.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return len(files)

    return _call(uri, copy)


def shared_path(path: str | Path) -> str:
    """What to hand another node for a file or folder of a run: its URI once uploaded, or the path itself."""
    mirror = _mirror_of(path)
    if mirror is None:
        return str(path)
    mirror.push(path)
    return mirror.remote(path)


def train_storage_path(local_dir: str | Path) -> str:
    """Ray Train's storage_path for a folder of a run: its URI (workers on any node write there) or the path."""
    mirror = _mirror_of(local_dir)
    return mirror.remote(local_dir) if mirror else str(Path(local_dir).expanduser().resolve())


def fetch(path: str) -> str:
    """A local path for `path`: itself, or for a URI a download into this node's adapter cache.

    The cache key covers the URI and each remote file's size and modification time, so files uploaded
    again under the same URI (a run started over under the same name) are downloaded again, never stale.
    """
    if not is_uri(path):
        return path
    filesystem, root = _filesystem(path)
    files = _listing(filesystem, root, path)
    if not files:
        raise StorageError(f"{redact(path)} holds no files; was it uploaded (see the driver's log)?")
    stamp = [(f.path, f.size, f.mtime_ns) for f in files]
    target = Path(ADAPTER_CACHE).expanduser() / hashlib.sha256(repr((path, stamp)).encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return str(target)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    _download(filesystem, root, partial, path)
    (partial / ".complete").write_text(path)
    try:
        os.replace(partial, target)  # atomic; another replica on this node may have finished first
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


# ---------------------------------------------------------------- node-local paths on a multi-node cluster


def check_shared(output_dir: str, nodes: list[dict], sees: Callable[[str, str, list[str]], dict[str, bool]],
                 after_write: Callable[[Path], None] | None = None) -> None:
    """Fail unless every alive node sees `output_dir` as the same directory (nothing to check for a URI).

    `nodes` are Ray's alive nodes ({"NodeID", "NodeManagerAddress"}); `sees(marker, token, node_ids)` says,
    per node, whether it reads `token` in the file `marker` (placement.marker_visible runs a task on each).
    `after_write` is a test hook called between writing the marker and asking the nodes.
    """
    if is_uri(output_dir) or len(nodes) < 2:
        return
    root = Path(output_dir).expanduser().resolve()
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    if len(hosts) > 1 and any(root == Path(p) or Path(p) in root.parents for p in NODE_LOCAL_ROOTS):
        raise ConfigError(f"output_dir={output_dir!r} ({root}) is node-local on this cluster of {len(nodes)} "
                          f"nodes on {len(hosts)} machines, so adapters and checkpoints written there would "
                          f"not reach the other nodes; {_FIX}")
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = root / f".bt-ray-shared-{token[:12]}"
    marker.write_text(token)
    try:
        if after_write is not None:
            after_write(marker)
        seen = sees(str(marker), token, [n["NodeID"] for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    blind = [n for n in nodes if not seen.get(n["NodeID"])]
    if blind:
        names = ", ".join(f"{n['NodeID'][:12]} ({n.get('NodeManagerAddress')})" for n in blind)
        raise ConfigError(f"output_dir={output_dir!r} ({root}) is not the same directory on every node: "
                          f"{len(blind)} of {len(nodes)} alive nodes cannot see a file written there by the "
                          f"driver: {names}. Adapters and checkpoints must reach every node; {_FIX}")
    logger.info("output_dir %s is shared by all %d nodes", root, len(nodes))


# ---------------------------------------------------------------- pyarrow


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    problems = uri_problems(uri)
    if problems:
        raise ConfigError(problems)
    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise StorageError(f"cannot open {redact(uri)}: {type(exc).__name__}: {exc}") from exc


def _call(uri: str, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except OSError as exc:
        raise StorageError(f"run storage {redact(uri)}: {exc}; check the credentials in the environment and "
                           f"that the bucket exists") from exc


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _upload(filesystem: Any, path: Path, dest: str, uri: str) -> None:
    def copy() -> None:
        filesystem.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as src, filesystem.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 1 << 20)

    _call(uri, copy)


def _listing(filesystem: Any, root: str, uri: str) -> list:
    """pyarrow FileInfo of every file under `root` (or of `root` itself, a file); [] when it does not exist."""
    from pyarrow import fs

    def files() -> list:
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.NotFound:
            return []
        return [info] if info.is_file else sorted(
            (f for f in filesystem.get_file_info(fs.FileSelector(root, recursive=True)) if f.is_file),
            key=lambda f: f.path)

    return _call(uri, files)


def _download(filesystem: Any, root: str, local: Path, uri: str) -> int:
    """Copy every file under `root` into `local`; returns how many (0 when there is nothing)."""
    files = _listing(filesystem, root, uri)

    def copy() -> int:
        for entry in files:
            rel = entry.path[len(root):].lstrip("/") or Path(entry.path).name
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(entry.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return len(files)

    return _call(uri, copy)
