"""bt-ray's exceptions. Every message says what failed, where, and what to try."""

import re


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """Text without the colour codes Ray puts on its actors' lines and errors."""
    return _COLOUR.sub("", text)


class BtRayError(Exception):
    """Base class for errors bt-ray raises on purpose."""


class ConfigError(BtRayError):
    """Bad configuration or input, found before any expensive work starts."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ResourceError(BtRayError):
    """The Ray cluster cannot provide what the config asks for."""


class EngineError(BtRayError):
    """An inference replica failed a request. Names the replica, the request and the cause."""


class RequestError(ValueError):
    """An engine refused one request (a prompt longer than the model's context, a bad sampling value).
    Not a BtRayError on purpose: that example fails like any program error, and the phase goes on."""


class TrainingError(BtRayError):
    """Fine-tuning failed or produced an unusable adapter."""


class AdapterError(BtRayError):
    """An adapter could not be loaded, or would not fit the engine."""


class MetricError(BtRayError):
    """The task's metric raised on every example it was given: a bug in the metric, not the model."""


class RetrievalError(BtRayError):
    """The retriever (a ColBERTv2 endpoint) failed; every example would score 0, so the run stops."""


class DataError(BtRayError):
    """A downloaded data file is missing, incomplete or not in the expected format."""
