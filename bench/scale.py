"""Lester et al.'s Figure 1 on minipt's real bases: test accuracy against the base's size, one
line per method (soft prompt, prefix tuning, LoRA, full fine-tuning) and zero-shot, on the
`sentiment` and `topic` tasks, at the methods table's budget (200 steps of 16, 800 test rows).

Each base's runs are bench/experiments.py's methods experiment in its own work folder (the
SmolLM2 runs are the methods table's own: out/experiments), run one after another and
resumable run by run. The report is made from the runs done so far, so it can be redrawn
while the bigger bases are still training:

    python bench/scale.py                        # run what is missing, then report
    python bench/scale.py --report-only          # the table and plot from the runs done
    python bench/scale.py --bases smollm2,qwen2.5 --seeds 3

Writes bench/results/scale/: runs.json (every run's result, kept in git so that a clean clone
remakes the report and adds to it), results.json, README.md (the table) and scale.png.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from experiments import LABELS, TASKS, git_commit, machine, pct, table  # noqa: E402
from weights import BASES, base_checkpoint  # noqa: E402

METHODS = ("prompt_tuning", "prefix_tuning", "lora", "full")
WORK = {"smollm2": "out/experiments"}          # the methods table's runs serve the smallest base
# Where a base needs another learning rate than the recipe's: on Qwen2.5 prefix tuning at 5e-4
# stalled at chance (loss ln 2, the same for both labels) in two runs
LR = {"qwen2.5": {"prefix_tuning": 1e-4}}


def work_dir(base: str) -> Path:
    return ROOT / WORK.get(base, f"out/scale/{base}")


def checkpoint_dir(base: str) -> Path:
    return ROOT / "weights" / BASES[base][1]


def parameters(checkpoint: Path) -> int:
    """The base's parameter count from its safetensors header, without loading it."""
    from safetensors import safe_open
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_base(base: str, methods, seeds: int, threads: int) -> None:
    """The base's missing runs, through experiments.py (which skips the runs already done)."""
    checkpoint = base_checkpoint(base)
    cmd = [sys.executable, str(ROOT / "bench" / "experiments.py"), "--only", "methods",
           "--methods", ",".join(methods), "--seeds", str(seeds), "--threads", str(threads),
           "--base", str(checkpoint), "--work", str(work_dir(base)),
           "--results", str(work_dir(base) / "results")]
    cmd += [f"--lr={m}={lr}" for m, lr in LR.get(base, {}).items() if m in methods]
    print(f"{base}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"error: the {base} runs failed; see the train.log of the last run in {work_dir(base)}/runs")


def restore(base: str, kept: list[dict]) -> None:
    """Write the kept runs of `base` back as result.json files in its work folder, so that
    experiments.py does not train them again on a clean clone."""
    for r in kept:
        done = work_dir(base) / "runs" / r["run"] / "result.json"
        if r["base"] == base and not done.exists():
            done.parent.mkdir(parents=True, exist_ok=True)
            result = {k: v for k, v in r.items() if k not in ("base", "parameters")}
            done.write_text(json.dumps(result, indent=1) + "\n")


def run_records(bases, methods, kept: list[dict]) -> list[dict]:
    """One record per run done: those `kept` in the committed runs.json, with the result.json
    files of this machine's work folders added (replacing a kept record of the same run)."""
    records = {(r["base"], r["run"]): r for r in kept}
    for base in bases:
        found = [p for task in TASKS for m in methods
                 for p in sorted((work_dir(base) / "runs").glob(f"{task}-{m}-s*/result.json"))]
        if found:
            n_params = parameters(checkpoint_dir(base))
        for path in found:
            r = json.loads(path.read_text())
            records[base, r["run"]] = dict(base=base, parameters=n_params, **r)
    return sorted(records.values(), key=lambda r: (r["base"], r["run"]))


def collect(records, bases, methods) -> list[dict]:
    """One row per base, task and method (and zero-shot): the mean over the seeds done."""
    rows = []
    for base in bases:
        for task in TASKS:
            found = {m: [r for r in records if (r["base"], r["task"], r["method"]) == (base, task, m)]
                     for m in methods}
            done = [rs[0] for rs in found.values() if rs]
            if done:
                rows.append(dict(base=base, parameters=done[0]["parameters"], task=task, method="zero_shot",
                                 accuracy=done[0]["zero_shot"], accuracy_std=0.0, seeds=1))
            for m, rs in found.items():
                if rs:
                    accs = [r["accuracy"] for r in rs]
                    rows.append(dict(base=base, parameters=rs[0]["parameters"], task=task, method=m,
                                     accuracy=statistics.mean(accs), seeds=len(accs),
                                     accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                     trainable_parameters=rs[0]["trainable_parameters"],
                                     train_seconds=statistics.mean(r["train_seconds"] for r in rs)))
    return rows


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4))
    sizes = {r["parameters"]: r["base"] for r in rows}         # every base on both panels' axes
    for ax, task in zip(axes, TASKS):
        for m in ("zero_shot",) + METHODS:
            pts = sorted((r["parameters"], 100 * r["accuracy"], 100 * r["accuracy_std"])
                         for r in rows if r["task"] == task and r["method"] == m)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=LABELS[m],
                            ls="--" if m == "zero_shot" else "-")
        ax.set_xscale("log")
        ax.set_xticks(sorted(sizes), [f"{sizes[n]}\n{n / 1e6:.0f} M" for n in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("base parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(report) -> str:
    rows = report["rows"]
    bases = list(dict.fromkeys(r["base"] for r in rows))
    lines = ["# Accuracy against model size (Lester et al. 2021, Figure 1)\n",
             f"Made by `{report['command']}` at commit `{report['commit']}`"
             f"{' (with uncommitted changes)' if report['dirty'] else ''} on {report['machine']}, "
             "1 torch thread per run; 200 steps of 16, 800 test rows per task, "
             "mean ± std where more than one seed is done. A blank cell: not run yet; "
             "`python bench/scale.py` runs what is missing. Every run's result: `runs.json`."
             + "".join(f" {LABELS[m].capitalize()} on {b} at lr {lr:g}, not its recipe's." for b, d in LR.items()
                       for m, lr in d.items() if b in bases)
             + "\n"]
    for task in TASKS:
        cells = {(r["base"], r["method"]): r for r in rows if r["task"] == task}
        header = ["method"] + [f"{b} ({next(r['parameters'] for r in rows if r['base'] == b) / 1e6:.0f} M)"
                               for b in bases]
        body = [[LABELS[m]] + [(pct(c["accuracy"], c["accuracy_std"] if c["seeds"] > 1 else None)
                                + (f" ({c['seeds']} seeds)" if c["seeds"] > 1 else ""))
                               if (c := cells.get((b, m))) else "" for b in bases]
                for m in ("zero_shot",) + METHODS]
        lines += [f"\n## {task} (% test accuracy)\n", table(header, body)]
    return "".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default=",".join(BASES), help=f"from {', '.join(BASES)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=1, help="seeds to run per method (all done are reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--report-only", action="store_true", help="no training: report the runs done")
    ap.add_argument("--results", default="bench/results/scale")
    args = ap.parse_args(argv)
    bases = [b for b in args.bases.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    for given, known in ((bases, BASES), (methods, LABELS)):
        if unknown := [x for x in given if x not in known]:
            ap.error(f"unknown {unknown[0]!r}; choose from {', '.join(known)}")
    out = ROOT / args.results
    kept = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else []
    if not args.report_only:
        for base in bases:
            restore(base, kept)
            run_base(base, methods, args.seeds, args.threads)
    records = run_records(bases, methods, kept)
    commit, dirty = git_commit()
    report = dict(command=" ".join(["python", "bench/scale.py"] + argv), commit=commit, dirty=dirty,
                  machine=machine(), rows=collect(records, bases, methods))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "README.md").write_text(markdown(report))
    plotted = plot(report["rows"], out / "scale.png")
    print(markdown(report))
    print(f"wrote {out}: runs.json, results.json, README.md{', scale.png' if plotted else ''}")


if __name__ == "__main__":
    main()
