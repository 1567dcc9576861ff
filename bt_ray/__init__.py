"""bt-ray: BetterTogether (prompt optimization + LoRA fine-tuning of DSPy programs) at scale on Ray."""

__version__ = "0.1.0"
