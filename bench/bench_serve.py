"""Serving under load: open-loop Poisson arrivals at several rates, requests for a mix of
prompt files, prompt lengths and answer lengths, through the server's own path (request
parser, scheduler, PromptBank) of three schedulers in the same run:

- one at a time: each request decoded alone, the next one when it is done (a batch of 1);
- static:        the rows queued when a batch starts decode together till its longest ends;
- continuous:    rows join the running batch at the next step and leave when they end.

On SmolLM2-135M-Instruct (`weights/smollm2-135m-instruct/`, converted on first use), with
random-init prompt files of three methods written to a temporary folder (a 20-token soft
prompt, 10-token P-tuning v2, a 10-token adapter on the top 8 layers) plus the bare base and
a composition. A pool of jobs (model, text, max_tokens) is drawn once: texts of 2 to ~120
tokens, max_tokens from a long-tailed mix (most answers short, a few long, as in chat
traffic); every answer is exactly max_tokens long (vLLM's ignore_eos) and greedy, and is
checked against `generate` with its prompt file alone. Arrival times are the same for every
scheduler at a rate (seeded), and nobody waits for an answer before sending the next request.

tokens/s: new tokens / (last answer - first arrival); first token: from the request's arrival
to its first token; per token: (answer done - first token) / (tokens - 1); p50 and p99 over
the requests. A scheduler that keeps up gives tokens/s near the offered load; past that it
saturates and queues grow.

    python bench/bench_serve.py                              # the table of bench/RESULTS.md
    python bench/bench_serve.py --rates 1 --requests 8 --modes static,continuous   # a quick check
"""
import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minipt.generation import generate  # noqa: E402
from minipt.prompts import PromptConfig, attach, load, save  # noqa: E402
from minipt.scheduler import ContinuousScheduler, StaticScheduler  # noqa: E402
from minipt.serve import App, parse_request  # noqa: E402

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
    "Summarize the following text.\n" + " ".join(
        ["The committee reviewed the proposal for a new public library in the town centre, weighing the cost "
         "of the building against the expected number of visitors, the state of the current library and the "
         "wishes of the residents who answered last year's survey."] * 2) + "\nSummary:",
    "Answer the question from the passage.\nPassage: The Amazon is the largest rainforest on Earth. It "
    "covers much of northern Brazil and extends into Peru, Colombia and other countries of South America. "
    "Its rivers carry more water than any other river system.\nQuestion: Which country holds most of it?\n"
    "Answer:",
]
MAX_TOKENS = [(8, 4), (16, 3), (32, 2), (64, 1), (128, 1)]   # (max_tokens, weight): mean ~30, max 128
MODELS = ["soft", "v2", "adapter", "base", "soft+adapter"]
MODES = {"single": "one at a time", "static": "static", "continuous": "continuous"}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.5,1,2", help="arrival rates, requests/s, comma-separated")
    ap.add_argument("--requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--modes", default="single,static,continuous")
    ap.add_argument("--single-rates", type=int, default=1,
                    help="one at a time runs at the first N rates only (it is saturated at the lowest)")
    ap.add_argument("--jobs", type=int, default=24, help="distinct (model, text, max_tokens) in the pool")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16 is faster on CPUs with bf16 matmul, but a batch rounds differently "
                         "from a row alone, and greedy near-ties flip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def write_prompts(app: App, folder: Path) -> None:
    """Random-init prompt files of three methods on the app's base (names as in MODELS)."""
    configs = {"soft": PromptConfig(method="prompt_tuning", num_virtual_tokens=20, init="random", seed=0),
               "v2": PromptConfig(method="p_tuning_v2", num_virtual_tokens=10, init="random", seed=1),
               "adapter": PromptConfig(method="adapter", num_virtual_tokens=10, adapter_layers=8,
                                       init="random", seed=2)}
    for name, cfg in configs.items():
        save(attach(app.base, cfg, app.tokenizer), folder / f"{name}.safetensors", app.tokenizer)


def job_pool(n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    lengths, weights = zip(*MAX_TOKENS)
    return [(MODELS[i % len(MODELS)], TEXTS[i % len(TEXTS)], rng.choices(lengths, weights)[0])
            for i in range(n)]


def oracle(app: App, folder: Path, jobs) -> dict:
    """job -> the text `generate` gives with the job's prompt alone (a batch of one)."""
    base, tok, out = app.base, app.tokenizer, {}
    for model, text, n in sorted(set(jobs), key=lambda j: -j[2]):
        if (model, text) in {(m, t) for m, t, _ in out}:      # a longer answer holds this one
            longer = max((j for j in out if j[:2] == (model, text)), key=lambda j: j[2])
            out[model, text, n] = out[longer][:n]
            continue
        if "+" in model:
            m = app.bank.for_rows([model])
        else:
            m = base if model == "base" else load(folder / f"{model}.safetensors", base, tok)
        out[model, text, n] = generate(m, [tok.encode(text)], n, pad_id=app.pad_id)[0]
    return {j: tok.decode(ids, skip_special=True) for j, ids in out.items()}


def use(app: App, mode: str, args) -> None:
    app.scheduler.close()
    big = 1 << 20   # open loop: every request is queued, none refused
    app.scheduler = (StaticScheduler(app, 1, 0.0, big) if mode == "single"
                     else StaticScheduler(app, args.max_batch, 0.005, big) if mode == "static"
                     else ContinuousScheduler(app, args.max_batch, big, args.prefill_chunk))


def body(job) -> dict:
    model, text, n = job
    return {"model": model, "prompt": text, "max_tokens": n, "temperature": 0, "ignore_eos": True}


def collect(rows, record) -> None:
    text = ""
    while True:
        ev = rows[0].events.get()
        if ev[0] == "delta":
            text += ev[2]
        elif ev[0] == "done":
            record.update(text=text, tokens=ev[4], done=time.monotonic(), first=rows[0].t_first)
            return
        else:
            record.update(error=ev[2].message, done=time.monotonic())
            return


def drive(app: App, schedule) -> list[dict]:
    """Submit each job at its time (open loop); every request's record once all are done."""
    records, threads = [], []
    t0 = time.monotonic() + 0.05
    for at, job in schedule:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        rows = parse_request(body(job), False, app)
        record = {"job": job, "arrived": rows[0].t_arrived}
        app.scheduler.submit(rows)
        records.append(record)
        threads.append(threading.Thread(target=collect, args=(rows, record), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    for r in records:
        r["t0"] = t0
    return records


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))] if s else float("nan")


def summarise(records, expected) -> dict:
    ok = [r for r in records if "error" not in r]
    seconds = max(r["done"] for r in records) - records[0]["t0"]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["first"] - r["arrived"] for r in ok]
    tpot = [(r["done"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"requests": len(records), "answered": len(ok), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "equal": sum(r.get("text") == expected[r["job"]] for r in ok)}


def main(argv=None):
    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    modes = args.modes.split(",")
    if not (BASE / "config.json").exists():
        from weights.smollm2 import main as convert_smollm2
        convert_smollm2()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        app = App(BASE, folder, getattr(torch, args.dtype), args.device, args.max_batch)
        write_prompts(app, folder)
        app.scan()
        jobs = job_pool(args.jobs, args.seed)
        rng = random.Random(args.seed + 1)
        schedules = {}
        for rate in rates:  # the same arrivals for every scheduler at a rate
            at, schedule = 0.0, []
            for _ in range(args.requests):
                schedule.append((at, rng.choice(jobs)))
                at += rng.expovariate(rate)
            schedules[rate] = schedule
        t = time.perf_counter()
        expected = oracle(app, folder, [j for s in schedules.values() for _, j in s])
        print(f"generate alone for {len(expected)} jobs: {time.perf_counter() - t:.0f} s", flush=True)
        for mode in modes:
            use(app, mode, args)
            drive(app, [(0.0, job) for job in jobs[:2]])          # warm-up
            for k, rate in enumerate(rates):
                if mode == "single" and k >= args.single_rates:
                    continue
                row = {"rate": rate, "mode": mode, **summarise(drive(app, schedules[rate]), expected)}
                results.append(row)
                print(f"  {MODES[mode]:<14} {rate:>5} req/s: {row['tokens_per_s']:7.1f} tokens/s, "
                      f"first token p99 {row['ttft_p99']:.2f} s, {row['equal']}/{row['requests']} equal",
                      flush=True)
        app.close()

    offered = {rate: rate * sum(n for _, _, n in jobs) / len(jobs) for rate in rates}   # the pool's mean
    print(f"\nSmolLM2-135M-Instruct, {args.dtype}, {args.device} ({cpu_name()}), "
          f"torch threads {torch.get_num_threads()}, "
          f"max batch {args.max_batch}: {args.requests} requests a rate over {', '.join(MODELS)}, Poisson "
          f"arrivals, max_tokens mix {MAX_TOKENS}, greedy")
    print("| rate (req/s) | offered tok/s | scheduler | tokens/s | first token p50 / p99 (s) "
          "| per token p50 / p99 (ms) | equal to generate | answered |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rate']} | {offered[r['rate']]:.0f} | {MODES[r['mode']]} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['tpot_p50'] * 1000:.0f} / {r['tpot_p99'] * 1000:.0f} "
              f"| {r['equal']}/{r['answered']} | {r['answered']}/{r['requests']} |")
    by = {(r["rate"], r["mode"]): r for r in results}
    print()
    for rate in rates:
        c, s, o = by.get((rate, "continuous")), by.get((rate, "static")), by.get((rate, "single"))
        line = f"{rate} req/s:"
        if c and s:
            line += (f" continuous / static throughput {c['tokens_per_s'] / s['tokens_per_s']:.2f}x,"
                     f" first-token p99 static / continuous {s['ttft_p99'] / c['ttft_p99']:.1f}x")
        if c and o:
            line += f"; continuous / one at a time {c['tokens_per_s'] / o['tokens_per_s']:.2f}x"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
