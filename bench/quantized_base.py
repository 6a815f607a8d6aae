"""Training through a base kept in its GGUF codes (`train.py --base_quant=gguf`) against the
same base expanded to fp32: accuracy on `sentiment` at one budget for both, then what each
costs (peak memory, training tokens/s), on minipt's real bases, and the memory projected to
bigger bases from the same measurements.

    python bench/quantized_base.py                          # SmolLM2: soft prompt x3 seeds, LoRA x1
    python bench/quantized_base.py --bases gemma3,qwen2.5 --seeds 1
    python bench/quantized_base.py --only cost --bases smollm2,gemma3,qwen2.5
    python bench/quantized_base.py --only cost --settings checkpointing
    python bench/quantized_base.py --report-only

Both precisions of a run share every setting (bench/experiments.py's recipe at --steps, the
first --test-rows test rows) but base_quant. Runs go to out/quantized/<base>/<quant>/ and are
resumable; every finished one is added to bench/results/quantized/runs.json (kept in git), from
which README.md (the tables) and quantized.png are remade. The cost runs are short train.py runs
(--cost-steps steps of 16 rows, 16 test rows) on an otherwise idle machine, one at a time, in
each of COST_SETTINGS (plain; gradient checkpointing; checkpointing with a lean C heap).
"""
import argparse
import dataclasses
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import experiments  # noqa: E402
from experiments import FULL, git_commit, machine, make_run, pct, table  # noqa: E402
from weights import base_checkpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quantized"
QUANTS = ("none", "gguf")
NAMES = {"none": "fp32", "gguf": "GGUF codes"}
# Llama-shaped bases for the projection: (layers, d_model, parameters)
# cost runs: train.py keys and environment beside the precision. A C heap that gives blocks of
# 2 MB and over back to the system at once (glibc's mmap threshold, fixed) trades speed for memory
COST_SETTINGS = {"plain": ({}, {}),
                 "checkpointing": ({"grad_checkpointing": True}, {}),
                 "checkpointing+lean-heap": ({"grad_checkpointing": True}, {"MALLOC_MMAP_THRESHOLD_": "2097152"})}
PROJECTED = {"1.1B (TinyLlama)": (22, 2048, 1.1e9), "7B (Llama 2)": (32, 4096, 6.7e9),
             "13B (Llama 2)": (40, 5120, 13.0e9), "70B (Llama 2)": (80, 8192, 69.0e9)}


def size(steps: int, test_rows: int):
    return dataclasses.replace(FULL, steps={**FULL.steps, "sentiment": steps},
                               test_rows={**FULL.test_rows, "sentiment": test_rows})


def work_dir(base: str, quant: str) -> Path:
    return ROOT / "out" / "quantized" / base / quant


def load_runs() -> list:
    path = RESULTS / "runs.json"
    return json.loads(path.read_text()) if path.exists() else []


def keep(record: dict) -> None:
    """Add (or replace) one record in runs.json, written whole."""
    runs = [r for r in load_runs() if (r["kind"], r["base"], r["run"], r["quant"]) !=
            (record["kind"], record["base"], record["run"], record["quant"])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runs.json").write_text(json.dumps(sorted(runs + [record], key=lambda r: (
        r["kind"], r["base"], r["run"], r["quant"])), indent=1) + "\n")


def accuracy_run(base, method, seed, quant, args) -> dict:
    checkpoint = base_checkpoint(base)
    sz = size(args.steps, args.test_rows)
    run = make_run("sentiment", method, seed, sz)
    run.settings.update(base_quant=quant, dtype="float32")
    work = work_dir(base, quant)
    data = experiments.write_tasks(work, sz, None)["sentiment"]
    result = experiments.train(run, str(checkpoint), data, work, threads=1)
    return dict(kind="accuracy", base=base, quant=quant, steps=args.steps, test_rows=args.test_rows,
                **made_where(), **result)


def cost_run(base, quant, setting, args) -> dict:
    """Peak RSS and training tokens/s of a short run (steps after the second only)."""
    checkpoint = base_checkpoint(base)
    keys, env = COST_SETTINGS[setting]
    sz = size(args.cost_steps, 16)
    run = make_run("sentiment", "prompt_tuning", 0, sz)
    run.name = f"cost-{setting}"
    run.settings.update(base_quant=quant, dtype="float32", log_interval=1, **keys)
    work = work_dir(base, quant)
    data = experiments.write_tasks(work / "cost", sz, None)["sentiment"]
    result = experiments.train(run, str(checkpoint), data, work, threads=1, env=env)
    steps = [json.loads(line) for line in (work / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tokens_per_s"] for r in steps if r["kind"] == "train" and r["step"] > 2]
    with open(work / "runs" / run.name / "train.log") as f:
        held = next((line.strip() for line in f if line.startswith("base_quant=")), "")
    return dict(kind="cost", base=base, quant=quant, run=run.name, setting=setting, steps=args.cost_steps,
                **made_where(), tokens_per_s=statistics.median(tok_s), peak_rss_gb=result["peak_rss_gb"],
                weights_line=held, parameters=parameters(checkpoint), shape=shape(checkpoint))


def made_where() -> dict:
    import torch
    return dict(commit=git_commit()[0][:10], machine=machine(), cpu_capability=torch.backends.cpu.get_cpu_capability())


def parameters(checkpoint: Path) -> int:
    from scale import parameters as count
    return count(checkpoint)


def shape(checkpoint: Path) -> list:
    config = json.loads((checkpoint / "config.json").read_text())
    return [config["n_layer"], config["n_embd"]]


# ---- the report ------------------------------------------------------------------------------

def accuracy_rows(runs) -> list:
    rows = []
    for base in dict.fromkeys(r["base"] for r in runs if r["kind"] == "accuracy"):
        for method in ("prompt_tuning", "lora"):
            cells = []
            for quant in QUANTS:
                accs = [r["accuracy"] for r in runs if r["kind"] == "accuracy" and
                        (r["base"], r["method"], r["quant"]) == (base, method, quant)]
                cells.append(accs)
            if not any(cells):
                continue
            means = [statistics.mean(a) if a else None for a in cells]
            gap = means[1] - means[0] if None not in means else None
            rows.append([base, experiments.LABELS[method]] +
                        [pct(statistics.mean(a), statistics.stdev(a) if len(a) > 1 else None) + f" ({len(a)})"
                         if a else "-" for a in cells] + [f"{100 * gap:+.2f}" if gap is not None else "-"])
    return rows


def cost_rows(runs) -> list:
    rows = []
    cost = {(r["base"], r.get("setting"), r["quant"]): r for r in runs if r["kind"] == "cost"}
    for base, setting in dict.fromkeys((b, s) for b, s, _ in cost):
        dense, coded = cost.get((base, setting, "none")), cost.get((base, setting, "gguf"))
        if not (dense and coded):
            continue
        rows.append([base, f"{dense['parameters'] / 1e6:.0f} M", setting, f"{dense['peak_rss_gb']:.2f}",
                     f"{coded['peak_rss_gb']:.2f}", f"{coded['peak_rss_gb'] / dense['peak_rss_gb']:.2f}x",
                     f"{dense['tokens_per_s']:.0f}", f"{coded['tokens_per_s']:.0f}",
                     f"{coded['tokens_per_s'] / dense['tokens_per_s']:.2f}x"])
    return rows


def weight_gb(record) -> float:
    """The weights' GB that train.py reported for a run through codes, or 4 bytes a parameter."""
    line = record.get("weights_line", "")
    if record["quant"] == "gguf" and "MB" in line:
        return float(line.split("take ")[1].split(" MB")[0]) / 1024
    return 4 * record["parameters"] / 2**30


def overheads(runs) -> dict:
    """{(base, quant): peak RSS - weights, GB}: activations of these batches and the runtime."""
    return {(r["base"], r["quant"]): r["peak_rss_gb"] - weight_gb(r) for r in runs
            if r["kind"] == "cost" and r.get("setting") == "plain"}


def projection_rows(runs) -> tuple:
    """The weights alone of Llama-shaped bases, in fp32 and at the measured codes' bytes a weight
    (the widest file's), whole and per GPU under FSDP over 8."""
    coded = [r for r in runs if r["kind"] == "cost" and r["quant"] == "gguf"]
    bytes_per_weight = max(weight_gb(r) * 2**30 / r["parameters"] for r in coded)
    rows = [[name, f"{4 * n / 2**30:.1f}", f"{bytes_per_weight * n / 2**30:.1f}",
             f"{bytes_per_weight * n / 2**30 / 8:.1f}"] for name, (_, _, n) in PROJECTED.items()]
    return rows, bytes_per_weight


def report(runs) -> str:
    where = sorted({f"{r.get('machine', '?')}, {r.get('cpu_capability', '?')}" for r in runs})
    commits = sorted({r.get("commit", "?") for r in runs})
    lines = ["# Training through a base kept in its GGUF codes", "",
             f"Made by `python bench/quantized_base.py` (runs at commit {', '.join(commits)}) on "
             f"{'; '.join(where)}; one torch thread per run, fp32 compute on both sides.", ""]
    acc = accuracy_rows(runs)
    if acc:
        steps = {(r["steps"], r["test_rows"]) for r in runs if r["kind"] == "accuracy"}
        lines += [f"## Accuracy: sentiment, {', '.join(f'{s} steps of 16, {t} test rows' for s, t in sorted(steps))}",
                  "", "Mean test accuracy % ± std over seeds (seeds in brackets); gap: codes - fp32, points.", "",
                  table(["base", "method", NAMES["none"], NAMES["gguf"], "gap"], acc), ""]
    cost = cost_rows(runs)
    if cost:
        lines += ["## Cost: soft prompt, batches of 16", "",
                  "Peak RSS of the whole train.py process (zero-shot and test evaluation included) and the "
                  "median training tokens/s after two steps.", "",
                  table(["base", "parameters", "setting", "peak GB fp32", "peak GB codes", "ratio", "tok/s fp32",
                         "tok/s codes", "ratio"], cost), ""]
    if any(r["kind"] == "cost" and r["quant"] == "gguf" for r in runs):
        rows, bpw = projection_rows(runs)
        over = overheads(runs)
        lines += ["## Memory projected to bigger bases", "",
                  f"Weights only: 4 bytes a parameter in fp32, {bpw:.2f} in codes (the widest measured file). "
                  "Activations and the runtime come on top: "
                  + ", ".join(f"{v:.2f} GB ({b}, {NAMES[q]})" for (b, q), v in sorted(over.items()))
                  + " in the measured runs, growing with the batch and layers x d_model, not with the weights.",
                  "", table(["base", "fp32 GB", "codes GB", "codes, FSDP over 8 GPUs, GB per GPU"], rows), ""]
    return "\n".join(lines)


def plot(runs, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cost = [r for r in runs if r["kind"] == "cost"]
    if not cost:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in COST_SETTINGS:
        for quant in QUANTS:
            pts = sorted((r["parameters"], r["peak_rss_gb"]) for r in cost
                         if (r["quant"], r.get("setting")) == (quant, setting))
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if quant == "gguf" else "--",
                        label=f"{NAMES[quant]}, {setting}")
    ax.set_xscale("log")
    ax.set_xlabel("base parameters")
    ax.set_ylabel("peak training RSS (GB)")
    ax.set_title("soft prompt training, batches of 16")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="accuracy,cost", help="accuracy, cost or both")
    ap.add_argument("--bases", default="smollm2")
    ap.add_argument("--methods", default="prompt_tuning,lora")
    ap.add_argument("--seeds", type=int, default=3, help="soft prompt seeds (LoRA: one)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--test-rows", type=int, default=400)
    ap.add_argument("--cost-steps", type=int, default=5)
    ap.add_argument("--settings", default=",".join(COST_SETTINGS), help="cost runs' settings, comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="accuracy runs at once (one thread each)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    parts, bases, settings = args.only.split(","), args.bases.split(","), args.settings.split(",")
    unknown = [s for s in settings if s not in COST_SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown {unknown[0]!r}; one of {', '.join(COST_SETTINGS)}")
    if not args.report_only:
        if "accuracy" in parts:
            todo = [(b, m, s, q) for b in bases for m in args.methods.split(",")
                    for s in range(args.seeds if m == "prompt_tuning" else 1) for q in QUANTS]
            with ThreadPoolExecutor(args.jobs) as pool:
                for record in pool.map(lambda t: accuracy_run(*t, args), todo):
                    keep(record)
                    print(f"{record['base']} {record['run']} {record['quant']}: {record['accuracy']:.4f}", flush=True)
        if "cost" in parts:
            for b in bases:
                for setting in settings:
                    for q in QUANTS:
                        record = cost_run(b, q, setting, args)
                        keep(record)
                        print(f"cost {b} {setting} {q}: {record['peak_rss_gb']:.2f} GB, "
                              f"{record['tokens_per_s']:.0f} tok/s", flush=True)
    runs = load_runs()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "README.md").write_text(report(runs))
    plot(runs, RESULTS / "quantized.png")
    print(report(runs))


if __name__ == "__main__":
    main()
