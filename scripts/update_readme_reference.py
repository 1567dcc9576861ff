"""Regenerate the config reference table in README.md from bt_ray/config.py (a test checks it is current)."""

from pathlib import Path

from bt_ray.cli import reference_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start = text.index("| key | default | meaning |")
end = text.index("\n\n", start)
readme.write_text(text[:start] + reference_markdown() + text[end:])
print(f"updated {readme}")
