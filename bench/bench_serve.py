"""Serving throughput: requests for different prompts decoded in mixed batches against the
same requests served one at a time, through the server's own path (request parser,
scheduler, PromptBank), in one run.

On SmolLM2-135M-Instruct (`weights/smollm2-135m-instruct/`, converted on first use), 64
completion requests spread round-robin over 4 prompts: by default four random 20-token
soft prompts written to a temporary folder, or the files of --prompts. Greedy, and every
request makes exactly --new-tokens tokens (EOS ignored, vLLM's `ignore_eos`) so both
modes do the same work:

- mixed:      all requests queued at once; the scheduler decodes them --max-batch rows
              at a time, each batch mixing the four prompts;
- one by one: each request sent when the previous one has been answered (batches of 1).

tokens/s = new tokens of all requests / wall time (tokenising, prefill and text decoding
included). The outputs of the two modes are compared too: greedy rows match unless a
near-tie flips under the different rounding of a batched product. With --http both modes
go through the HTTP server on loopback instead (concurrent client threads for the mixed
mode).

    python bench/bench_serve.py                                    # 64 requests x 32 tokens
    python bench/bench_serve.py --requests 16 --new-tokens 8       # a quick check
"""
import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minipt.prompts import PromptConfig, attach, save  # noqa: E402
from minipt.serve import App, Server, parse_request  # noqa: E402

BASE = ROOT / "weights" / "smollm2-135m-instruct"
TEXTS = [
    "Review: a gripping, funny film with a great cast\nSentiment:",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Translate to German: The weather is nice today.\n",
    "1, 2, 3, 5, 8, 13,",
    "Write a short poem about the sea, the wind and a lighthouse keeper who never sleeps.",
    "In 1969,",
    "Summarize: The city council met on Tuesday to discuss the new park and the budget for next year.",
    "Hello",
    "The three primary colours are",
    "Review: a tedious mess that never finds its footing\nSentiment:",
    "A recipe for pancakes:\n1.",
    "Dear team, thank you for",
    "The mitochondria is",
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prompts", type=Path, default=None,
                    help="folder of prompt files for this base (default: 4 random 20-token soft prompts)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="as the server's --dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--http", action="store_true", help="send the requests over HTTP (loopback)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def random_soft_prompts(app: App, folder: Path, n: int = 4, length: int = 20) -> None:
    """n random-init soft prompts on the app's base, saved as task0..task{n-1}."""
    for i in range(n):
        model = attach(app.base, PromptConfig(method="prompt_tuning", num_virtual_tokens=length,
                                              init="random", seed=i), app.tokenizer)
        save(model, folder / f"task{i}.safetensors", app.tokenizer)


def bodies(names, args) -> list[dict]:
    return [{"model": names[i % len(names)], "prompt": TEXTS[i % len(TEXTS)], "max_tokens": args.new_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(args.requests)]


def wait(rows) -> tuple[str, int]:
    """(text, new tokens) of a one-prompt request once its row is done."""
    text = ""
    while True:
        ev = rows[0].events.get()
        if ev[0] == "delta":
            text += ev[2]
        elif ev[0] == "done":
            return text, ev[4]
        else:
            raise RuntimeError(ev[2].message)


def direct(app: App, requests, together: bool):
    """Through the parser and the scheduler, no HTTP."""
    if together:
        pending = [parse_request(b, False, app) for b in requests]
        for rows in pending:
            app.scheduler.submit(rows)
        return [wait(rows) for rows in pending]
    out = []
    for b in requests:
        rows = parse_request(b, False, app)
        app.scheduler.submit(rows)
        out.append(wait(rows))
    return out


def over_http(url: str, requests, together: bool):
    def post(body):
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            reply = json.loads(r.read())
        return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]
    if together:
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(post, requests))
    return [post(b) for b in requests]


def main(argv=None):
    args = parse_args(argv)
    if not (BASE / "config.json").exists():
        from weights.smollm2 import main as convert_smollm2
        convert_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.prompts or Path(tmp)
        app = App(BASE, folder, getattr(torch, args.dtype), args.device, args.max_batch, window=0.005)
        if args.prompts is None:
            random_soft_prompts(app, folder)
        names = app.model_ids()[1:]  # the prompts; "base" first
        if not names:
            sys.exit(f"error: {folder}: no prompt files for this base")
        requests = bodies(names, args)
        server = None
        if args.http:
            server = Server(("127.0.0.1", 0), app)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            run = lambda reqs, together: over_http(server.url, reqs, together)
        else:
            run = lambda reqs, together: direct(app, reqs, together)

        run(requests[:2], True)  # warm-up: first-call allocations, thread pools
        results = {}
        for mode, together in (("mixed", True), ("one by one", False)):
            before = dict(app.scheduler.batch_sizes)
            t0 = time.perf_counter()
            out = run(requests, together)
            seconds = time.perf_counter() - t0
            sizes = {k: v - before.get(k, 0) for k, v in app.scheduler.batch_sizes.items()
                     if v > before.get(k, 0)}
            tokens = sum(n for _, n in out)
            results[mode] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                             "batches": dict(sorted(sizes.items())), "texts": [t for t, _ in out]}
        if server:
            server.shutdown()
            server.server_close()
        else:
            app.close()

    mixed, single = results["mixed"], results["one by one"]
    same = sum(a == b for a, b in zip(mixed["texts"], single["texts"]))
    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{'HTTP' if args.http else 'scheduler'}: {args.requests} requests over {len(names)} prompts "
          f"({', '.join(names)}), {args.new_tokens} new tokens each, greedy")
    print(f"{'mode':<12} {'batches (size: count)':<24} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for mode, r in results.items():
        batches = ", ".join(f"{k}: {v}" for k, v in r["batches"].items())
        print(f"{mode:<12} {batches:<24} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f}")
    ratio = mixed["tokens_per_s"] / single["tokens_per_s"]
    print(f"mixed / one by one: {ratio:.2f}x;  identical outputs: {same}/{args.requests}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ratio": ratio,
                                         "identical": same, **{m: {k: v for k, v in r.items() if k != "texts"}
                                                               for m, r in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
