"""bench/gpu_serving.py's arms (a), (a+) and (a2) against the FAKE vllm package of test_vllm_engine.py (a
recorder, no model, one FAKE engine step per request), so that a GPU run does not find their bugs first: the
arms report in order, (a2) starts from an emptied prefix cache and sends the very token ids (a) sends, and
with step stats each arm counts its own steps."""

import sys
from pathlib import Path

from bt_ray.config import load_config
from bt_ray.inference.chat import prompt_ids

from .test_vllm_engine import fake_vllm  # noqa: F401 (the fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_raw_arms_report_in_order_and_send_the_same_prompts(fake_vllm, monkeypatch, tmp_path):  # noqa: F811
    import gpu_serving
    from transformers import AutoTokenizer

    from bt_ray.synthetic import read_config, write_config_only

    model_dir = str(write_config_only(tmp_path / "llama-3-8b", read_config(gpu_serving.ARCH)))
    config = load_config(None, ["inference.vllm.max_lora_rank=32", "inference.vllm.step_stats=true",
                                f"output_dir={tmp_path}"])
    reqs = gpu_serving.requests(12)
    engines, arms = [], []
    monkeypatch.setattr(fake_vllm["vllm.v1.engine.async_llm"].AsyncLLM, "from_engine_args",
                        classmethod(lambda cls, args, stat_loggers=None: engines.append(cls(args, stat_loggers))
                                    or engines[-1]))
    raw, rendered = gpu_serving.raw_vllm(config, model_dir, reqs, concurrency=4, warmup=2,
                                         on_arm=lambda name, result: arms.append((name, result)))

    assert [name for name, _ in arms] == ["raw", "raw_queued", "raw_rendered"]
    assert arms[0] == ("raw", raw) and arms[2] == ("raw_rendered", rendered)
    queued = arms[1][1]
    assert raw["engine_start_s"] >= 0 and "engine_start_s" not in rendered
    assert raw["generated_tokens"] == queued["generated_tokens"] == rendered["generated_tokens"] == 12 * 3  # 3 each
    for arm in (raw, queued, rendered):
        assert arm["engine_steps"]["steps"] == 12 and arm["engine_steps"]["tokens_per_step"] == 3  # the arm's own
    for arm in (raw, rendered):
        assert 0 <= arm["latency_s"]["p50"] <= arm["latency_s"]["p90"] <= arm["latency_s"]["max"] <= arm["wall_s"] + 0.01
        parts = arm["per_request_s"]  # in-process: no Ray path; the parts fill each request's slot
        assert parts["ray_path"] == 0 and min(parts.values()) >= 0
        assert abs(parts["idle"] + parts["render"] + parts["engine"] - parts["slot"]) < 1e-3
    assert raw["per_request_s"]["render"] < rendered["per_request_s"]["render"]  # (a)'s ids were ready
    [engine] = engines
    kinds = [call[0] for call in engine.calls]
    assert kinds == ["generate"] * 26 + ["reset_prefix_cache"] + ["generate"] * 14 + ["shutdown"]
    sent = [call[1]["prompt_token_ids"] for call in engine.calls if call[0] == "generate"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = [prompt_ids(tokenizer, r.messages) for r in reqs]
    assert sorted(sent[:14]) == sorted(sent[26:]) == sorted(expected[:2] + expected)
    assert sorted(sent[14:26]) == sorted(expected)


def test_every_arm_captures_cuda_graphs_up_to_the_gpu_configs_step_size(tmp_path):
    """At 64 in flight vLLM's default would graph steps up to 128 tokens only; the bench's engines graph up to
    --capture-size (512, what max_batch_size 256 gives the GPU configs), and --eager or 0 leave vLLM's choice."""
    import gpu_serving

    from bt_ray.inference.vllm_args import engine_kwargs

    def captured(**options):
        config = gpu_serving.run_config(str(tmp_path), 64, max_model_len=2048, **options)
        return engine_kwargs(config.inference, str(tmp_path)).get("max_cudagraph_capture_size")

    assert captured(eager=False) == gpu_serving.CAPTURE_SIZE == 512
    assert captured(eager=False, capture_size=256) == 256
    assert captured(eager=False, capture_size=0) is None and captured(eager=True) is None
    gpu = load_config(Path(__file__).resolve().parents[2] / "configs" / "gpu.yaml", [])
    assert min(2 * gpu.inference.max_batch_size, 512) == gpu_serving.CAPTURE_SIZE  # vLLM's default there
