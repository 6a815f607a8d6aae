"""Generate text with a minipt base model, optionally with a trained prompt file.

    python generate.py --base weights/smollm2-135m-instruct --chat --text "What is the capital of France?"
    python generate.py --base weights/smollm2-135m-instruct --text "Once upon a time" \
        --temperature 0.8 --top-p 0.9
    python generate.py --base weights/smollm2-135m-instruct --prompt out/sentiment/prompt.safetensors \
        --text $'Review: a gripping, funny film\nSentiment:' --labels " negative, positive"

Several --text arguments run as one left-padded batch. With --chat the text is wrapped in
the model's chat template (ChatML for SmolLM2-Instruct; a plain "User: ...\nAssistant:"
transcript for a pretrained model without one, such as Gemma 3 270M or GPT-2) and generation stops
at its end of turn. T5 checkpoints take the text as encoder input ("translate English to German: ...").
"""
import sys
import time

import torch

from minipt.checkpoint import check_checkpoint, load_base
from minipt.cli import ArgumentParser
from minipt.config import T5Config
from minipt.data import encode_prompt
from minipt.devices import check_device
from minipt.evaluation import rank_classify
from minipt.generation import check_sampling, compile_decoding, generate
from minipt.packed import pack_for_decoding
from minipt.prompts import load as load_prompt
from minipt.prompts.files import check_fingerprint, checkpoint_fingerprint, read_prompt
from minipt.prompts.mixed import PromptBank


def parse_args(argv=None):
    ap = ArgumentParser(description="Generate text with a minipt base model.")
    ap.add_argument("--base", required=True, help="minipt checkpoint directory (see weights/)")
    ap.add_argument("--text", action="append", required=True, help="input text; repeat for a batch")
    ap.add_argument("--prompt", help="a prompt file from train.py; style.safetensors+task.safetensors "
                                     "composes several (their virtual tokens and prefixes in that order)")
    ap.add_argument("--labels", help="comma-separated candidates: rank-classify each text instead of "
                                     "generating")
    ap.add_argument("--chat", action="store_true", help="wrap each text as a user turn of the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--lookup", type=int, default=0,
                    help="greedy, one text: check up to N prompt-lookup draft tokens per forward "
                         "(same tokens, faster when the text repeats itself)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--packed", action="store_true",
                    help="CPU: decode from the 4-bit codes of a checkpoint converted from GGUF Q4_1 "
                         "(minipt.packed), ~2x faster; the projections' inputs are rounded to bf16")
    ap.add_argument("--compile", action="store_true",
                    help="decoder models: torch.compile the one-token step; with --packed 1.3-1.7x faster "
                         "per token, after one to three minutes of compiling "
                         "(minipt.generation.compile_decoding)")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def parse_labels(text: str) -> list:
    """" negative, positive" -> [" negative", " positive"]: a leading space is kept."""
    labels = [label for label in text.split(",") if label.strip()]
    labels = [" " + label.strip() if label.startswith(" ") else label.strip() for label in labels]
    if not labels:
        raise ValueError(f"--labels={text!r}: no labels; give them comma-separated, "
                         "e.g. ' negative, positive'")
    return labels


def check_args(args):
    """Every option checked before the model loads; (model config, tokenizer) of --base."""
    if args.packed and args.device != "cpu":
        raise ValueError(f"--packed is for CPU decoding, not --device {args.device}")
    check_device(args.device, f"--device {args.device}", "--device cpu")
    if not args.labels:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.lookup < 0 or (args.lookup and (args.temperature > 0 or len(args.text) > 1)):
        raise ValueError(f"--lookup={args.lookup}: a count >= 0, for greedy decoding of one text")
    empty = [t for t in args.text if not t.strip()]
    if empty:
        raise ValueError(f"--text={empty[0]!r}: empty; give the text to continue")
    if args.labels is not None:
        parse_labels(args.labels)
    config, tok = check_checkpoint(args.base)
    is_t5 = isinstance(config, T5Config)
    if args.chat and (not hasattr(tok, "apply_chat_template") or tok.chat_format is None):
        raise ValueError(f"{args.base}: this tokenizer has no chat template (drop --chat)")
    if is_t5 and (args.compile or args.lookup):
        option = "compile" if args.compile else "lookup"
        raise ValueError(f"--{option}: decoder models only; {args.base} is T5")
    if args.prompt:
        here = checkpoint_fingerprint(args.base, tok)
        for path in args.prompt.split("+"):
            check_fingerprint(path, read_prompt(path)[0], here)
    return config, tok


def classify(model, tok, args):
    """Rank classification: the most likely of the candidate labels after each text."""
    labels = parse_labels(args.labels)
    rows = [{"input": t, "target": labels[0]} for t in args.text]  # targets are unused here
    _, predictions, probs = rank_classify(model, tok, rows, "{input}", labels)
    for text, label, p in zip(args.text, predictions, probs):
        print(f"{label.strip()}\t{p.max().item():.3f}\t{text!r}")


def with_prompt(base, spec, tok):
    """One prompt file (any method), or several joined by '+', composed."""
    paths = spec.split("+")
    if len(paths) == 1:
        return load_prompt(spec, base, tok)
    bank = PromptBank(base)
    for i, path in enumerate(paths):
        bank.add(f"part{i}", path, tok)
    return bank.for_rows("+".join(f"part{i}" for i in range(len(paths))))


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        model, tok = load_base(args.base, dtype=getattr(torch, args.dtype), device=args.device)
        if args.prompt:
            model = with_prompt(model, args.prompt, tok)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    packed = args.packed and pack_for_decoding(model) > 0
    if args.packed and not packed:
        print(f"warning: {args.base} holds no exact 4-bit codes; decoding in {args.dtype}", file=sys.stderr)
    if args.labels:
        return classify(model, tok, args)
    if args.compile:
        compile_decoding(model)
    texts = args.text
    if args.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    is_t5 = isinstance(model.config, T5Config)
    prompts = [tok.encode(t) if is_t5 else encode_prompt(tok, t) for t in texts]  # T5 keeps its EOS
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    t0 = time.perf_counter()
    try:  # bad settings (--lookup with sampling, a context overflow) are generate's ValueErrors
        outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, pad_id=pad or 0,
                           eos_id=tok.chat_stop_ids if args.chat else tok.eos_id,
                           seed=args.seed, lookup=args.lookup)
    except ValueError as e:
        sys.exit(f"error: {e}")
    seconds = time.perf_counter() - t0
    for text, out in zip(args.text, outputs):
        if len(outputs) > 1:
            print(f"### {text}")
        print(tok.decode(out, skip_special=True).strip())
    n = sum(len(o) for o in outputs)
    kind = "t5" if isinstance(model.config, T5Config) else model.config.source
    how = args.dtype + (", packed" if packed else "") + (", compiling included" if args.compile else "")
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s, {kind}, {how}]", file=sys.stderr)


if __name__ == "__main__":
    main()
