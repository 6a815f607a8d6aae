"""What a prompt file holds:

    python -m minipt.inspect PROMPT [--base DIR] [--top K]

prints the method, its config, the trainable-parameter count, the fingerprint of the base
model it was saved with, and for soft prompts (prompt_tuning; p_tuning through the prompt
its encoder computes) the K vocabulary tokens nearest each virtual token by cosine
similarity with the base's input embedding. Lester et al. 2021 (§7) read learned prompts
this way: a prompt token's neighbours often form a semantic cluster, and ones initialised
from class labels tend to keep those labels as nearest neighbours. Nothing forces a
virtual token to lie near any real one, so low similarities are normal.

`--base` (default weights/smollm2-135m-instruct) is read only for soft prompts, and must
be the base the prompt was trained on.
"""
import sys
import textwrap

import torch
import torch.nn.functional as F

from .cli import ArgumentParser
from .prompts.base import METHODS, method_class
from .prompts.files import check_base, read_prompt

DEFAULT_BASE = "weights/smollm2-135m-instruct"


def soft_prompt(meta: dict, tensors: dict):
    """The (P, C) vectors a soft prompt puts before the input, or None for other methods.
    A P-tuning file holds its encoder's output as "prompt" too (see p_tuning.py)."""
    method = meta["config"]["method"]
    return tensors["prompt"] if method in METHODS and method_class(method).holds_soft_prompt else None


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, embedding: torch.Tensor, k: int = 5):
    """(similarities, token ids), each (P, k): per virtual token the k vocabulary entries of
    highest cosine similarity, most similar first."""
    a = F.normalize(prompt.detach().float().cpu(), dim=-1)                   # (P, C)
    b = F.normalize(embedding.detach().float().cpu(), dim=-1)                # (V, C)
    return (a @ b.T).topk(min(k, b.size(0)), dim=-1)                          # (P, k) each


def token_text(tokenizer, i: int) -> str:
    if tokenizer is None:
        return f"#{i}"
    return repr(tokenizer.decode([i], skip_special=False))  # quoted: leading spaces and newlines show


def _fields(d: dict) -> str:
    return textwrap.fill(" ".join(f"{k}={v!r}" for k, v in d.items()), 100, subsequent_indent="    ")


def report(path, meta: dict, tensors: dict, base=None, tokenizer=None, top: int = 5) -> str:
    """The printed text; `base` only matters for soft prompts."""
    fp = meta["base"]
    lines = [f"prompt: {path}",
             f"method: {meta['config']['method']}",
             f"trainable parameters: {meta['trainable_parameters']:,}",
             f"config: {_fields(meta['config'])}",
             f"base model: {_fields(fp['model'])}",
             f"base embedding sha256: {fp['embedding_sha256']}",
             f"base tokenizer sha256: {fp.get('tokenizer_sha256', '(not recorded)')}"]
    prompt = soft_prompt(meta, tensors)
    if prompt is not None and base is not None and top > 0:
        sims, ids = nearest_tokens(prompt, base.embed.weight, top)
        lines.append("nearest vocabulary tokens (cosine similarity with the input embedding), "
                     f"top {ids.size(1)}:")
        for p, (row_s, row_i) in enumerate(zip(sims.tolist(), ids.tolist())):
            lines.append(f"  {p:3d}  " + "  ".join(f"{token_text(tokenizer, i)} {s:.3f}"
                                                   for s, i in zip(row_s, row_i)))
    return "\n".join(lines)


def inspect_prompt(path, base_dir=DEFAULT_BASE, top: int = 5) -> str:
    meta, tensors = read_prompt(path)
    base = tokenizer = None
    if soft_prompt(meta, tensors) is not None and top > 0:
        from .checkpoint import load_base
        base, tokenizer = load_base(base_dir)
        check_base(path, meta, base, tokenizer)  # neighbours in another model's embedding would mean nothing
    return report(path, meta, tensors, base, tokenizer, top)


def main(argv=None):
    ap = ArgumentParser(prog="python -m minipt.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", help="minipt prompt file (.safetensors)")
    ap.add_argument("--base", default=DEFAULT_BASE,
                    help=f"minipt checkpoint the prompt was trained on (default {DEFAULT_BASE})")
    ap.add_argument("--top", type=int, default=5, help="nearest tokens shown per virtual token (0: none)")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error(f"--top {args.top}: must be at least 0")
    try:
        text = inspect_prompt(args.prompt, args.base, args.top)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(text)


if __name__ == "__main__":
    main()
