"""Many adapters on one server: throughput, latency and memory when every request names one
of 100 soft prompts and 20 LoRAs at random, against the same load on a single soft prompt.

One frozen SmolLM2-135M-Instruct (`weights/smollm2-135m-instruct/`) behind the server's own
path (request parser, continuous scheduler, PromptBank); random-init adapter files written
to a temporary folder: 20-token soft prompts and rank-8 LoRAs on q_proj and v_proj (B drawn
small, so every LoRA changes the answers). Open-loop Poisson arrivals, the same arrival times
and (text, max_tokens) jobs in every scenario, greedy, every answer exactly max_tokens long:

- single: every request names the one soft prompt;
- many:   each request names one of the 120 adapters at random (a LoRA one time in six),
          so a batch holds rows of many soft prompts and LoRAs, each applied per row.

Each scenario runs in a process of its own, so its peak RSS is its own. A sample of answers
is checked against `generate` with that adapter file loaded alone.

    python bench/bench_adapters.py                 # bench/results/adapters/ (table, JSON, plot)
    python bench/bench_adapters.py --requests 12 --rates 2 --no-write     # a quick check
"""
import argparse
import collections
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_serve import MAX_TOKENS, TEXTS, cpu_name, drive, summarise  # noqa: E402
from minipt.checkpoint import load_base  # noqa: E402
from minipt.generation import generate  # noqa: E402
from minipt.prompts import PromptConfig, attach, load, save  # noqa: E402
from minipt.scheduler import ContinuousScheduler  # noqa: E402
from minipt.serve import App  # noqa: E402

BASE = ROOT / "weights" / "smollm2-135m-instruct"
OUT = ROOT / "bench" / "results" / "adapters"
SCENARIOS = {"single": "1 soft prompt", "many": "100 soft prompts + 20 LoRAs"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.5,1,2", help="arrival rates, requests/s, comma-separated")
    ap.add_argument("--requests", type=int, default=48, help="requests per rate")
    ap.add_argument("--soft-prompts", type=int, default=100)
    ap.add_argument("--loras", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--check", type=int, default=8, help="answers checked against generate alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/results/ alone")
    ap.add_argument("--scenario", choices=list(SCENARIOS), help=argparse.SUPPRESS)   # the child process
    return ap.parse_args(argv)


def adapter_names(args) -> list[str]:
    return [f"soft{i}" for i in range(args.soft_prompts)] + [f"lora{i}" for i in range(args.loras)]


def write_adapters(app: App, folder: Path, n_soft: int, n_lora: int) -> None:
    """n_soft soft prompts and n_lora LoRAs on the app's base (named as adapter_names)."""
    base, tok = app.base, app.tokenizer
    for i in range(n_soft):
        cfg = PromptConfig(method="prompt_tuning", num_virtual_tokens=20, init="random", seed=i)
        save(attach(base, cfg, tok), folder / f"soft{i}.safetensors", tok)
    for i in range(n_lora):
        model = attach(base, PromptConfig(method="lora", lora_r=8, seed=i))
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for p in model.method.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        save(model, folder / f"lora{i}.safetensors", tok)
        model.method.detach(base)   # the next adapter starts from the plain base again


def schedules(args, names: list[str]) -> dict:
    """rate -> [(arrival time, (model, text, max_tokens))], the same draws for every scenario;
    the model is a random adapter (scenario "many") or replaced by the one soft prompt."""
    rng = random.Random(args.seed)
    lengths, weights = zip(*MAX_TOKENS)
    out = {}
    for rate in [float(r) for r in args.rates.split(",")]:
        at, schedule = 0.0, []
        for _ in range(args.requests):
            schedule.append((at, (rng.choice(names), rng.choice(TEXTS), rng.choices(lengths, weights)[0])))
            at += rng.expovariate(rate)
        out[rate] = schedule
    return out


def run_scenario(args) -> dict:
    """One scenario in this process: its table rows, peak RSS and the checked answers."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        app = App(BASE, folder, getattr(torch, args.dtype), "cpu", args.max_batch)
        many = args.scenario == "many"
        write_adapters(app, folder, args.soft_prompts if many else 1, args.loras if many else 0)
        t = time.perf_counter()
        app.scan()
        load_s = time.perf_counter() - t
        app.scheduler.close()
        app.scheduler = ContinuousScheduler(app, args.max_batch, 1 << 20)     # open loop: nothing refused
        plans = schedules(args, adapter_names(args))
        if not many:
            plans = {rate: [(at, ("soft0", *job[1:])) for at, job in s] for rate, s in plans.items()}
        jobs = sorted({job for s in plans.values() for _, job in s})
        drive(app, [(0.0, jobs[0]), (0.0, jobs[-1])])                      # warm-up
        runs = {}
        for rate, plan in plans.items():
            runs[rate] = drive(app, plan), app.stats()["prompt_states"]
            print(f"  {SCENARIOS[args.scenario]:<28} {rate:>4} req/s done", file=sys.stderr, flush=True)
        app.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # MB (Linux: kB); before the checks
        # the checks: a sample of jobs generated with the adapter file alone, on a base of their own
        base, tok = load_base(BASE, dtype=getattr(torch, args.dtype))
        expected = {}
        for model, text, n in random.Random(args.seed + 1).sample(jobs, min(args.check, len(jobs))):
            m = load(folder / f"{model}.safetensors", base, tok)
            expected[model, text, n] = tok.decode(generate(m, [tok.encode(text)], n, pad_id=app.pad_id)[0],
                                                  skip_special=True)
            if model.startswith("lora"):
                m.method.detach(base)
        rows = [{"scenario": args.scenario, "rate": rate, "prompt_states": ps,
                 "checked": sum(r["job"] in expected for r in records if "error" not in r),
                 **summarise(records, collections.defaultdict(lambda: None, expected))}   # unchecked: unequal
                for rate, (records, ps) in runs.items()]
    return {"rows": rows, "peak_rss_mb": peak, "adapters": len(app.bank.names), "load_s": load_s}


def plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, label in SCENARIOS.items():
        rows = results[name]["rows"]
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["tokens_per_s"] for r in rows], "o-", label=label)
        axes[1].plot(rates, [r["ttft_p99"] for r in rows], "o-", label=label)
        axes[2].plot(rates, [r["tpot_p99"] * 1000 for r in rows], "o-", label=label)
    for ax, title in zip(axes, ["throughput (tokens/s)", "first token p99 (s)", "per token p99 (ms)"]):
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results, args) -> str:
    single = {r["rate"]: r for r in results["single"]["rows"]}
    lines = ["| rate (req/s) | adapters | tokens/s | vs single | first token p50 / p99 (s) "
             "| per token p50 / p99 (ms) | peak RSS (MB) | vs single | checked equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate in single:
        for name, label in SCENARIOS.items():
            r = next(x for x in results[name]["rows"] if x["rate"] == rate)
            rss, rss1 = results[name]["peak_rss_mb"], results["single"]["peak_rss_mb"]
            lines.append(f"| {rate} | {label} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / single[rate]['tokens_per_s']:.2f}x | "
                         f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                         f"{r['tpot_p50'] * 1000:.0f} / {r['tpot_p99'] * 1000:.0f} | {rss:.0f} | "
                         f"{rss / rss1:.2f}x | {r['equal']}/{r['checked']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.scenario:
        print(json.dumps(run_scenario(args)))
        return
    if not (BASE / "config.json").exists():
        from weights.smollm2 import main as convert_smollm2
        convert_smollm2()
    results = {}
    for name in SCENARIOS:
        child = [sys.executable, __file__, "--scenario", name] + [a for a in (argv or sys.argv[1:])
                                                                   if a != "--no-write"]
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    machine = (f"SmolLM2-135M-Instruct, {args.dtype}, {cpu_name()} "
               f"(torch {torch.backends.cpu.get_cpu_capability()}), torch threads {torch.get_num_threads()}, "
               f"max batch {args.max_batch}, {args.requests} requests a rate, max_tokens mix {MAX_TOKENS}, "
               f"greedy")
    text = table(results, args)
    print(f"\n{machine}\n{text}")
    if args.no_write:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), **results},
                                                 indent=2))
    plot(results, OUT / "adapters.png")
    many = results["many"]
    (OUT / "README.md").write_text(
        f"# Many adapters on one server\n\n`python bench/bench_adapters.py` ({machine}).\n\n{text}\n\n"
        f"{many['adapters']} adapter files loaded in {many['load_s']:.1f} s; prompt states of the "
        f"soft prompts (LRU of 64) at the last rate: {many['rows'][-1]['prompt_states']}.\n\n"
        f"![throughput and latency against the arrival rate](adapters.png)\n")


if __name__ == "__main__":
    main()
