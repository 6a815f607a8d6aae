"""The base models' fetch-and-convert scripts (one per base) and what they share."""
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The real bases: name -> (the fetch asset of its GGUF, the folder of its minipt checkpoint)
BASES = {"smollm2": ("smollm2-gguf", "smollm2-135m-instruct"),
         "gemma3": ("gemma3-270m-gguf", "gemma-3-270m"),
         "qwen2.5": ("qwen2.5-coder-0.5b-gguf", "qwen2.5-coder-0.5b-instruct")}


def fetch_and_convert(asset: str, name: str) -> Path:
    """weights/NAME/, converted from the fetched ASSET once; later calls find it ready."""
    from minipt.convert import convert
    from minipt.fetch import fetch
    from minipt.quantized import CODES_FILE
    out = HERE / name
    if (out / "model.safetensors").exists() and (out / CODES_FILE).exists():
        print(f"{out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out} is ready")
        return out
    convert(fetch(asset), out, force=True)      # force: a conversion from before codes were kept
    print(f"converted to {out}")
    return out


def base_checkpoint(name: str) -> Path:
    """weights/<folder>/ of a base in BASES, fetched and converted on first use."""
    return fetch_and_convert(*BASES[name])


def base_gguf(name: str) -> Path:
    """The GGUF a base in BASES is converted from (what transformers reads in the benchmarks)."""
    from minipt.fetch import fetch
    return fetch(BASES[name][0])
