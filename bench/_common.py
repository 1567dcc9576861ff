"""What the benches share: the DSPy baseline's LM (plain per-request transformers), load average, Iris data.

The baseline is what a DSPy user writes for a local transformers model without bt-ray: a `dspy.LM`
whose engine calls `model.generate` once per request. Fine-tuned models (see end_to_end.py) are
registered under their own model name and served by the same engine, so calls are counted per model.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import dspy  # noqa: E402
import torch  # noqa: E402
from dspy.lm15 import Message, Request, Response, TextPart, Usage  # noqa: E402

from bt_ray.inference.engine import COMPLETION_MARKER  # noqa: E402
from bt_ray.inference.lm import request_messages  # noqa: E402

BASE_MODEL = "local/smollm2-135m-plain"


class PlainGenerateEngine:
    """One `generate` call per request; greedy at temperature 0, else sampling at the request's temperature.

    `models` maps a dspy.LM model name to the transformers model that serves it (the base model under
    BASE_MODEL; end_to_end.py adds fine-tuned ones). `calls` counts requests per model name.
    """

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.models = {BASE_MODEL: base}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def complete(self, request: Request) -> Response:
        if request.model not in self.models:
            raise KeyError(f"no model registered as {request.model!r}; known: {sorted(self.models)}")
        model = self.models[request.model]
        ids = self.tokenizer.apply_chat_template(list(request_messages(request)), add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        cfg = request.config
        sampling = {"do_sample": False}
        if cfg.temperature:
            sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p or 1.0}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_tokens or 128,
                                 stop_strings=[COMPLETION_MARKER], tokenizer=self.tokenizer, **sampling)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        with self._lock:
            self.calls[request.model] += 1
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=ids.shape[1],
                                                          output_tokens=out.shape[1] - ids.shape[1]))

    def stream(self, request: Request):
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __deepcopy__(self, memo):
        return self


def plain_lm(engine: PlainGenerateEngine, *, temperature: float, max_tokens: int, provider=None) -> dspy.LM:
    """The baseline's dspy.LM over `engine`; DSPy's response cache off (the bt-ray side runs without it too)."""
    return dspy.LM(BASE_MODEL, engine=engine, cache=False, temperature=temperature, max_tokens=max_tokens,
                   provider=provider)


def model_dir() -> str:
    from bt_ray.config import ModelConfig
    from bt_ray.model import resolve_model

    return str(resolve_model(ModelConfig().name, ModelConfig().cache_dir))


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"
