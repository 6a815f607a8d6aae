"""The base models' fetch-and-convert scripts (one per base) and what they share."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fetch_and_convert(asset: str, name: str) -> Path:
    """weights/NAME/, converted from the fetched ASSET once; later calls find it ready."""
    from minipt.convert import convert
    from minipt.fetch import fetch
    out = HERE / name
    if (out / "model.safetensors").exists():
        print(f"{out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out} is ready")
        return out
    convert(fetch(asset), out)
    print(f"converted to {out}")
    return out
