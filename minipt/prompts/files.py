"""Prompt files: one `.safetensors` whose tensors are the method's state and whose header
metadata (key "minipt") is a small JSON: the method config, the trainable-parameter count,
and a fingerprint of the base model and tokenizer it was trained on. A 20-token soft prompt
on SmolLM2 is 20 x 576 fp32 values, about 46 kB.
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import load_config
from ..fileio import atomic_write
from ..tensorfile import read_row_blocks
from .base import METHODS, method_class

FORMAT = "minipt-prompt/1"
ROWS_AT_ONCE = 4096          # embedding rows hashed at a time


def base_fingerprint(base, tokenizer=None) -> dict:
    # a quantized base carries its checkpoint's embedding hash, taken when it loaded
    return fingerprint(base.config, getattr(base, "embedding_sha256", None) or base.embed.weight, tokenizer)


def checkpoint_fingerprint(directory, tokenizer=None) -> dict:
    """The fingerprint of a checkpoint directory from its config and embedding alone, without
    building the model: prompt files are checked against a base before it loads."""
    return fingerprint(load_config(directory), checkpoint_embedding_sha256(directory), tokenizer)


def checkpoint_embedding_sha256(directory) -> str:
    """embedding_sha256 of a checkpoint's embedding, read a block of rows at a time."""
    return embedding_sha256(read_row_blocks(Path(directory) / "model.safetensors", "embed.weight", ROWS_AT_ONCE))



def embedding_sha256(blocks) -> str:
    """The hash of an embedding matrix given as consecutive blocks of its rows (or whole),
    rounded to bf16 so that fp32 and bf16 loads of one checkpoint agree."""
    h = hashlib.sha256()
    for block in [blocks] if isinstance(blocks, torch.Tensor) else blocks:
        h.update(block.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(config, embedding, tokenizer=None) -> dict:
    """What makes a base model the same base: its config, a hash of its embedding matrix
    (`embedding`: the matrix, or its embedding_sha256) and of its vocabulary."""
    digest = embedding if isinstance(embedding, str) else embedding_sha256(embedding)
    fp = {"model": dict(vars(config)), "embedding_sha256": digest}
    if tokenizer is not None:
        vocab = getattr(tokenizer, "vocab", None)
        if vocab is None and hasattr(tokenizer, "sp"):
            vocab = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.sp.get_piece_size())]
        text = json.dumps(vocab if isinstance(vocab, list) else sorted(vocab.items()) if vocab else None)
        fp["tokenizer_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return fp


def save_prompt(path, model, tokenizer=None, fingerprint=None) -> Path:
    """Write a PromptedModel's method to `path` atomically (temp file + rename). fingerprint:
    the base's, when the caller keeps it (a sharded base's embedding is on no one rank whole)."""
    path = Path(path)
    method = model.method
    meta = {"format": FORMAT, "config": method.config.to_dict(), "trainable_parameters": model.num_trainable(),
            "base": fingerprint or base_fingerprint(model.base, tokenizer)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_for_saving().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"minipt": json.dumps(meta)}))
    return path


def read_prompt(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a prompt file; a one-line ValueError if it is not one."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["minipt"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such prompt file") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a minipt prompt file (no 'minipt' metadata)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: prompt format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, tensors


def check_base(path, meta: dict, base, tokenizer=None) -> None:
    """Refuse to load a prompt onto a base it was not trained on, saying what differs."""
    check_fingerprint(path, meta, base_fingerprint(base, tokenizer))


def check_fingerprint(path, meta: dict, here: dict) -> None:
    saved = meta["base"]
    if saved["model"] != here["model"]:
        diff = sorted(k for k in set(saved["model"]) | set(here["model"])
                      if saved["model"].get(k) != here["model"].get(k))
        k = diff[0]
        raise ValueError(f"{path}: trained on a different base model ({k}: {saved['model'].get(k)!r} "
                         f"in the prompt, {here['model'].get(k)!r} here)")
    # a file that replaces every weight (full fine-tuning: its hash is of the tuned embedding)
    # needs only the architecture to match
    method = meta.get("config", {}).get("method")
    if (not (method in METHODS and method_class(method).trains_base)
            and saved["embedding_sha256"] != here["embedding_sha256"]):
        raise ValueError(f"{path}: trained on a different base model (same architecture, other weights: "
                         f"embedding hash {saved['embedding_sha256']} vs {here['embedding_sha256']})")
    if ("tokenizer_sha256" in saved and "tokenizer_sha256" in here
            and saved["tokenizer_sha256"] != here["tokenizer_sha256"]):
        raise ValueError(f"{path}: trained with a different tokenizer (vocabulary hash differs)")
