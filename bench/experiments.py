"""Reproducible experiments on SmolLM2-135M-Instruct, sized for a 2-core CPU (issue #8).

    python bench/experiments.py                      # the full run: hours on a 2-core machine
    python bench/experiments.py --only methods --seeds 1   # the methods table, one seed
    python bench/experiments.py --quick              # every experiment with tiny budgets (minutes)
    python bench/experiments.py --only init,length   # some experiments (they share runs)

  methods         soft prompt, P-tuning, prefix tuning, P-tuning v2, prompt adapter, LoRA and
                  full fine-tuning against zero-shot on `sentiment` and `topic`, several seeds:
                  test accuracy, trainable parameters, training time, peak RSS, file size
  init            soft-prompt initialisation (Lester et al. 2021, §3.2): random uniform,
                  sampled vocabulary, text, class labels; sentiment
  length          soft-prompt length: 1, 5, 20, 50, 100 virtual tokens; sentiment, one seed
  ensemble        prompts of different seeds as one ensemble against their mean and best
                  member (Lester et al. 2021, §5); `evaluation.ensemble_classify`
  interpretation  nearest vocabulary tokens of trained sentiment prompts (Lester et al.
                  2021, §7); `inspect.nearest_tokens`

Every training run is `train.py` in its own process, so its time and peak RSS are its own.
Its settings go into a config file (`settings.py` in the run's folder under --work) that
train.py reads; its folder also holds train.py's log and outputs and, written last,
`result.json`. A run whose result.json exists is not run again, so an interrupted
experiment resumes where it stopped, and experiments share runs with the same settings
(the text-initialised 20-token sentiment prompt of seed 0 serves four of them).

The tasks are written as JSONL under --work: each keeps its training set and the first rows
of its test set (all 800 in the full run); a task with `max_prompt_tokens` keeps only the
questions whose prompt fits. The results
(results.json, results.md with every table, PNG plots) go to --results.
"""
import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipt.fileio import atomic_write  # noqa: E402
from minipt.prompts.base import METHODS as METHOD_NAMES, drop_unread  # noqa: E402
from minipt.tasks import BUILTIN, load_task  # noqa: E402

EXPERIMENTS = ("methods", "init", "length", "ensemble", "interpretation")
CKPT_INTERVAL = 25  # steps; an interrupted run (full fine-tuning of a big base: hours) continues

# Method settings besides each method's recipe (learning rate, warm-up, adapter layers), which
# train.py takes from each method class's recipe(): every prompt is 20 tokens, initialised from the
# task's text.
METHODS = {
    "prompt_tuning": dict(num_virtual_tokens=20),
    "p_tuning": dict(num_virtual_tokens=20, encoder_type="lstm", encoder_hidden=256),
    "prefix_tuning": dict(num_virtual_tokens=20, prefix_projection=True, projection_hidden=512),
    "p_tuning_v2": dict(num_virtual_tokens=20, prefix_projection=False),
    "adapter": dict(num_virtual_tokens=20),
    "lora": dict(lora_r=8, lora_alpha=16.0),
    "full": dict(),
}
LABELS = {"prompt_tuning": "soft prompt", "p_tuning": "P-tuning", "prefix_tuning": "prefix tuning",
          "p_tuning_v2": "P-tuning v2", "adapter": "prompt adapter", "lora": "LoRA",
          "full": "full fine-tuning", "zero_shot": "zero-shot"}

TASKS = {  # per task: the text a text-initialised prompt starts from, sequence limits
    "sentiment": dict(init_text="Classify the sentiment of this movie review as positive or negative.",
                      max_len=96, max_prompt_tokens=None),
    "topic": dict(init_text="Classify the topic of this news article as business, entertainment, politics, "
                            "sports or tech.", max_len=128, max_prompt_tokens=None),
}
INITS = ("random", "vocab", "text", "labels")
LENGTHS = (1, 5, 20, 50, 100)


@dataclass
class Size:
    """How big each experiment is. FULL fits about an hour on a quiet 2-core CPU."""
    seeds: int                # seeds per method and per initialisation
    ensemble: int             # prompts (seeds) in the ensemble
    steps: dict               # task -> optimizer steps
    batch_size: dict          # task -> rows per step
    test_rows: dict           # task -> test rows (the same rows for every run)
    lengths: tuple = LENGTHS


FULL = Size(seeds=3, ensemble=5, steps={"sentiment": 200, "topic": 200},
            batch_size={"sentiment": 16, "topic": 16}, test_rows={"sentiment": 800, "topic": 800})
QUICK = Size(seeds=2, ensemble=3, steps={"sentiment": 3, "topic": 3}, batch_size={"sentiment": 2, "topic": 2},
             test_rows={"sentiment": 16, "topic": 16}, lengths=(5, 20))


# --------------------------------------------------------------------------- the runs


@dataclass
class Run:
    name: str
    task: str
    settings: dict  # train.py config keys


def make_run(task, method, seed, size: Size, init="text", length=None) -> Run:
    """The run of `method` on `task`; a soft prompt's init and length show in the name only
    when they differ from the methods experiment's (text, 20), so equal settings share a run."""
    settings = dict(method=method, seed=seed, steps=size.steps[task], batch_size=size.batch_size[task],
                    max_len=TASKS[task]["max_len"], template=BUILTIN[task][1],
                    init="text", init_text=TASKS[task]["init_text"], schedule="linear",
                    eval_interval=0, ckpt_interval=CKPT_INTERVAL, log_interval=10)  # test only at the end
    settings.update(METHODS[method])
    name = f"{task}-{method}-s{seed}"
    length = length or settings.get("num_virtual_tokens")
    if method == "prompt_tuning" and (init, length) != ("text", settings["num_virtual_tokens"]):
        settings.update(init=init, num_virtual_tokens=length)
        if init == "labels":
            settings["init_labels"] = BUILTIN[task][2]
        name = f"{task}-{method}-{init}{length}-s{seed}"
    return Run(name, task, drop_unread(settings))


def plan(experiments, size: Size, methods) -> list[Run]:
    """Every run the chosen experiments need, once each, in the order they run."""
    runs = []
    if "methods" in experiments:
        runs += [make_run(t, m, s, size) for t in TASKS for m in methods for s in range(size.seeds)]
    if "init" in experiments:
        runs += [make_run("sentiment", "prompt_tuning", s, size, init=i)
                 for i in INITS for s in range(size.seeds)]
    if "length" in experiments:
        runs += [make_run("sentiment", "prompt_tuning", 0, size, length=n) for n in size.lengths]
    if "ensemble" in experiments:
        runs += [make_run("sentiment", "prompt_tuning", s, size) for s in range(size.ensemble)]
    if "interpretation" in experiments:
        runs += [make_run("sentiment", "prompt_tuning", 0, size, init=i) for i in ("text", "labels")]
    unique = {}
    for r in runs:
        unique.setdefault(r.name, r)
    return list(unique.values())


def write_tasks(work: Path, size: Size, tokenizer) -> dict:
    """task -> folder of the fixed subsets as train/validation/test JSONL (train.py reads them)."""
    folders = {}
    for name, spec in TASKS.items():
        task = load_task(name)
        splits = task.splits
        if spec["max_prompt_tokens"]:
            fits = lambda r: len(tokenizer.encode(task.prompt(r))) <= spec["max_prompt_tokens"]
            splits = {k: [r for r in rows if fits(r)] for k, rows in splits.items()}
        # validation rows are never scored (eval_interval=0) but train.py needs the file
        splits = {"train": splits["train"], "validation": splits["validation"][:8],
                  "test": splits["test"][:size.test_rows[name]]}
        folder = work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            path = folder / f"{split}.jsonl"
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
        folders[name] = folder
    return folders


def settings_file(settings: dict) -> str:
    """A train.py config file: `key = literal` lines (the command line would strip the
    leading spaces of labels like " positive")."""
    return "".join(f"{k} = {v!r}\n" for k, v in settings.items())


def train(run: Run, base: str, data: Path, work: Path, threads: int, env=None) -> dict:
    """Run train.py for `run` (unless its result.json exists) and return its result.
    env: variables set for it beside OMP_NUM_THREADS."""
    out = work / "runs" / run.name
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    # a run without result.json was interrupted: it continues from its last checkpoint, or
    # starts again when it saved none
    saved = out / "checkpoint.pt"
    again = {"resume": True} if saved.exists() else {"overwrite": True}
    (out / "settings.py").write_text(settings_file({**run.settings, "base": base, "data": str(data),
                                                    "out_dir": str(out), **again}))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(out / "settings.py")], cwd=ROOT,
                          env={**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out / "train.log").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"error: {run.name}: train.py exited with {proc.returncode}; see {out / 'train.log'}:\n"
                 + "\n".join(proc.stdout.splitlines()[-5:]))
    from minipt.prompts.files import read_prompt
    test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    prompt = out / "prompt.safetensors"
    result = dict(run=run.name, task=run.task, method=run.settings["method"], seed=run.settings["seed"],
                  init=run.settings.get("init"), num_virtual_tokens=run.settings.get("num_virtual_tokens"),
                  accuracy=test["accuracy"], zero_shot=test["zero_shot"],
                  trainable_parameters=read_prompt(prompt)[0]["trainable_parameters"],
                  train_seconds=test["train_seconds"], peak_rss_gb=test["peak_rss_gb"],
                  prompt_file_bytes=prompt.stat().st_size, process_seconds=time.perf_counter() - started)
    resumed = re.search(r"resumed from .* at step (\d+)", proc.stdout)
    if resumed:  # the times above are then those of the last part only
        result["resumed_at_step"] = int(resumed.group(1))
    if run.settings["method"] == "full":
        prompt.unlink()  # a whole fp32 copy of the model; its size is recorded above
    saved.unlink(missing_ok=True)  # only needed until the run is complete
    # written last and whole: its presence means the run is complete
    atomic_write(done, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    return result


# --------------------------------------------------------------------------- experiments


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def methods_rows(results, size, methods, n_params, test_sets):
    """Per task and method the mean over seeds. Zero-shot is deterministic: every run measures
    the same, but full fine-tuning does it in fp32 and the others in bf16, as they train."""
    rows, per_seed = [], []
    for task in TASKS:
        majority = max(statistics.mean(r["target"] == label for r in test_sets[task])
                       for label in BUILTIN[task][2])
        zero = results[make_run(task, min(methods, key=lambda m: m == "full"), 0, size).name]["zero_shot"]
        rows.append(dict(task=task, method="zero_shot", accuracy=zero, accuracy_std=0.0, seeds=1,
                         trainable_parameters=0, share=0.0, train_seconds=0.0, peak_rss_gb=None,
                         prompt_file_bytes=0, majority=majority))
        for method in methods:
            rs = [results[make_run(task, method, s, size).name] for s in range(size.seeds)]
            per_seed += rs
            acc, std = mean_std([r["accuracy"] for r in rs])
            rows.append(dict(task=task, method=method, accuracy=acc, accuracy_std=std, seeds=len(rs),
                             trainable_parameters=rs[0]["trainable_parameters"],
                             share=rs[0]["trainable_parameters"] / n_params,
                             train_seconds=statistics.mean(r["train_seconds"] for r in rs),
                             peak_rss_gb=max((r["peak_rss_gb"] for r in rs if r["peak_rss_gb"] is not None),
                                             default=None),  # runs kept without it
                             prompt_file_bytes=rs[0]["prompt_file_bytes"], majority=majority))
    return rows, per_seed


def init_rows(results, size):
    rows = []
    for init in INITS:
        rs = [results[make_run("sentiment", "prompt_tuning", s, size, init=init).name]
              for s in range(size.seeds)]
        acc, std = mean_std([r["accuracy"] for r in rs])
        rows.append(dict(init=init, accuracy=acc, accuracy_std=std, seeds=[r["accuracy"] for r in rs],
                         zero_shot=rs[0]["zero_shot"]))
    return rows


def length_rows(results, size):
    return [dict(num_virtual_tokens=n,
                 **{k: results[make_run("sentiment", "prompt_tuning", 0, size, length=n).name][k]
                    for k in ("accuracy", "train_seconds", "trainable_parameters")})
            for n in size.lengths]


def load_bf16(base):
    """The base as train.py evaluates it (bf16 frozen weights), and its tokenizer."""
    import torch
    from minipt.checkpoint import load_base
    return load_base(base, dtype=torch.bfloat16)


def ensemble_result(results, size, base, work, test_rows):
    """The ensemble's members scored alone and together, in one batched forward per batch."""
    from minipt.evaluation import ensemble_classify
    from minipt.prompts.mixed import PromptBank
    model, tok = load_bf16(base)
    bank = PromptBank(model)
    names = []
    for s in range(size.ensemble):
        name = make_run("sentiment", "prompt_tuning", s, size).name
        bank.add(name, work / "runs" / name / "prompt.safetensors", tok)
        names.append(name)
    task = BUILTIN["sentiment"]
    r = ensemble_classify(bank, names, tok, test_rows, task[1], task[2])
    return dict(members=r["members"], runs_reported=[results[n]["accuracy"] for n in names],
                member_mean=statistics.mean(r["members"]), member_best=max(r["members"]),
                ensemble_mean_logprob=r["mean"], ensemble_vote=r["vote"])


def interpretation_result(size, base, work, top=5):
    """For each trained prompt: every virtual token's nearest vocabulary tokens before and
    after training, and how many still have their starting token as the nearest."""
    from minipt.inspect import nearest_tokens
    from minipt.prompts import PromptConfig
    from minipt.prompts.files import read_prompt
    from minipt.prompts.soft_prompt import initial_prompt
    model, tok = load_bf16(base)
    embed = model.embed.weight
    show = lambda i: tok.decode([i], skip_special=False)
    out = {}
    for init in ("text", "labels"):
        name = make_run("sentiment", "prompt_tuning", 0, size, init=init).name
        meta, tensors = read_prompt(work / "runs" / name / "prompt.safetensors")
        config = PromptConfig.from_dict(meta["config"])
        start = initial_prompt(config, model.embed, tok, config.num_virtual_tokens)
        _, start_ids = nearest_tokens(start, embed, 1)
        sims, ids = nearest_tokens(tensors["prompt"], embed, top)
        moved = (tensors["prompt"].float() - start).norm(dim=-1) / start.norm(dim=-1)
        label_ids = {i for label in BUILTIN["sentiment"][2] for i in tok.encode(label)}
        out[init] = dict(run=name, tokens=[
            dict(index=p, start=show(start_ids[p, 0].item()), nearest=[show(i) for i in ids[p].tolist()],
                 similarity=[round(s, 3) for s in sims[p].tolist()],
                 relative_change=round(moved[p].item(), 3))
            for p in range(ids.size(0))],
            kept_start_token=int((ids[:, 0] == start_ids[:, 0]).sum()),
            label_token_in_top=int(sum(bool(set(row) & label_ids) for row in ids.tolist())))
    return out


# --------------------------------------------------------------------------- tables and plots


def pct(x, std=None):
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    size = report["size"]
    training = ", ".join(f"{t} {size['steps'][t]} steps of {size['batch_size'][t]}" for t in TASKS)
    parts = [f"# Experiments on {Path(report['base']).name}\n",
             f"Made by `{report['command']}` at commit `{report['commit']}`"
             f"{' (with uncommitted changes)' if report['dirty'] else ''}, "
             f"in {report['wall_seconds'] / 60:.0f} min "
             f"on {report['machine']}, {report['threads']} torch thread(s) per run. "
             f"Written by bench/experiments.py; "
             f"numbers are accuracies in % on fixed "
             f"test subsets ({', '.join(f'{t}: {n} rows' for t, n in size['test_rows'].items())}), "
             f"mean ± std over seeds. Training: {training}, "
             f"AdamW with each method's recipe (its class's recipe()), bf16 frozen weights.\n"]
    if "methods" in report:
        parts.append("## Methods\n")
        for task in TASKS:
            rows = [r for r in report["methods"] if r["task"] == task]
            parts.append(f"### {task} (majority class {pct(rows[0]['majority'])} %)\n")
            parts.append(table(
                ["method", "accuracy %", "trainable parameters", "share of model", "training time (s)",
                 "peak RSS (GB)", "prompt file"],
                [[LABELS[r["method"]],
                  pct(r["accuracy"], r["accuracy_std"] if r["method"] != "zero_shot" else None),
                  f"{r['trainable_parameters']:,}", f"{100 * r['share']:.3g} %", f"{r['train_seconds']:.0f}",
                  "" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}",
                  _size(r["prompt_file_bytes"])]
                 for r in rows]))
    if "init" in report:
        parts.append("## Soft-prompt initialisation (sentiment, 20 tokens)\n")
        parts.append(table(["init", "accuracy %", "per seed"],
                           [[r["init"], pct(r["accuracy"], r["accuracy_std"]),
                             ", ".join(pct(a) for a in r["seeds"])]
                            for r in report["init"]]))
    if "length" in report:
        parts.append("## Soft-prompt length (sentiment, text init, seed 0)\n")
        parts.append(table(["virtual tokens", "accuracy %", "trainable parameters", "training time (s)"],
                           [[r["num_virtual_tokens"], pct(r["accuracy"]), f"{r['trainable_parameters']:,}",
                             f"{r['train_seconds']:.0f}"] for r in report["length"]]))
    if "ensemble" in report:
        e = report["ensemble"]
        parts.append(f"## Ensemble of {len(e['members'])} soft prompts "
                     f"(sentiment, seeds 0-{len(e['members']) - 1})\n")
        parts.append(table(["", "accuracy %"], [
            ["members", ", ".join(pct(a) for a in e["members"])], ["mean member", pct(e["member_mean"])],
            ["best member", pct(e["member_best"])],
            ["ensemble, mean log-probability", pct(e["ensemble_mean_logprob"])],
            ["ensemble, majority vote", pct(e["ensemble_vote"])]]))
    if "interpretation" in report:
        parts.append("## Nearest vocabulary tokens of trained sentiment prompts (seed 0)\n")
        for init, r in report["interpretation"].items():
            n = len(r["tokens"])
            parts.append(f"### {init} init: {r['kept_start_token']}/{n} tokens still nearest "
                         f"to their starting token; "
                         f"{r['label_token_in_top']}/{n} have a class label among their top 5\n")
            parts.append(table(["#", "started as", "nearest now (cosine similarity)", "relative change"],
                               [[t["index"], _quote(t["start"]),
                                 ", ".join(f"{_quote(w)} {s:.2f}"
                                           for w, s in zip(t["nearest"], t["similarity"])),
                                 f"{t['relative_change']:.2f}"] for t in r["tokens"]]))
    return "\n".join(parts)


def _size(n):
    return "" if not n else f"{n / 1e6:.0f} MB" if n > 1e6 else f"{n / 1e3:.0f} kB"


def _quote(token):
    return "`" + repr(token)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def plots(report: dict, folder: Path) -> list:
    """PNG plots of each experiment; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if "methods" in report:
        fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4))
        for ax, task in zip(axes, TASKS):
            rows = [r for r in report["methods"] if r["task"] == task]
            zero = next(r for r in rows if r["method"] == "zero_shot")
            ax.axhline(100 * zero["accuracy"], color="gray", ls="--", label="zero-shot")
            ax.axhline(100 * zero["majority"], color="gray", ls=":", label="majority class")
            for r in rows:
                if r["method"] != "zero_shot":
                    ax.errorbar(r["trainable_parameters"], 100 * r["accuracy"], yerr=100 * r["accuracy_std"],
                                fmt="o", capsize=3)
                    ax.annotate(LABELS[r["method"]], (r["trainable_parameters"], 100 * r["accuracy"]),
                                textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.set(xscale="log", xlabel="trainable parameters", ylabel="test accuracy (%)", title=task)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        save(fig, "methods.png")
    if "init" in report:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        rows = report["init"]
        ax.bar([r["init"] for r in rows], [100 * r["accuracy"] for r in rows],
               yerr=[100 * r["accuracy_std"] for r in rows], capsize=4, color="tab:blue")
        ax.axhline(100 * rows[0]["zero_shot"], color="gray", ls="--", label="zero-shot")
        low = min(100 * (r["accuracy"] - r["accuracy_std"])
                  for r in rows + [dict(accuracy=rows[0]["zero_shot"], accuracy_std=0)])
        ax.set(ylim=(max(0, low - 5), 100), ylabel="test accuracy (%)", title="soft-prompt initialisation")
        ax.legend(fontsize=8)
        save(fig, "init.png")
    if "length" in report:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        rows = report["length"]
        ax.plot([r["num_virtual_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o")
        ax.set(xscale="log", xlabel="virtual tokens", ylabel="test accuracy (%)", title="soft-prompt length")
        ax.grid(alpha=0.3)
        save(fig, "length.png")
    if "ensemble" in report:
        e = report["ensemble"]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        names = [f"seed {i}" for i in range(len(e["members"]))] + ["mean\nmember", "best\nmember",
                                                                   "ensemble\n(mean)", "ensemble\n(vote)"]
        values = e["members"] + [e["member_mean"], e["member_best"], e["ensemble_mean_logprob"],
                                 e["ensemble_vote"]]
        ax.bar(names, [100 * v for v in values],
               color=["tab:blue"] * len(e["members"]) + ["tab:gray"] * 2 + ["tab:orange"] * 2)
        ax.set(ylim=(max(0, 100 * min(values) - 5), 100), ylabel="test accuracy (%)", title="prompt ensemble")
        ax.tick_params(axis="x", labelsize=7)
        save(fig, "ensemble.png")
    return written


# --------------------------------------------------------------------------- main


def git_commit():
    """(commit, dirty) of the tree the script runs from; ("unknown", True) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def machine():
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu})"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets: every experiment in minutes")
    ap.add_argument("--only", default=",".join(EXPERIMENTS),
                    help=f"comma-separated: {', '.join(EXPERIMENTS)}")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES), help="methods for the methods experiment")
    ap.add_argument("--base", default="weights/smollm2-135m-instruct",
                    help="minipt checkpoint (relative to the repo)")
    ap.add_argument("--work", default="out/experiments", help="runs and task subsets (kept for resuming)")
    ap.add_argument("--results", default="bench/results", help="where results.json, results.md and plots go")
    # On a shared machine two threads on two busy cores wait on each other: a training step
    # measured 10x slower than with one thread. One thread per run is slower only when quiet.
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per method (default: 3, or 2 with --quick)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="this method's runs at this learning rate instead of its recipe's")
    args = ap.parse_args(argv)
    experiments = [e.strip() for e in args.only.split(",") if e.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, known in ((experiments, EXPERIMENTS), (methods, METHOD_NAMES)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad[0]!r}; choose from {', '.join(known)}")
    lrs = {}
    for given in args.lr:
        method, _, lr = given.partition("=")
        if method not in METHOD_NAMES:
            ap.error(f"--lr {given!r}: unknown method; choose from {', '.join(METHOD_NAMES)}")
        try:
            lrs[method] = float(lr)
        except ValueError:
            lrs[method] = 0.0                                    # refused just below
        if not lrs[method] > 0:                                  # nan too
            ap.error(f"--lr {given!r}: METHOD=LR, LR a number above 0")
    size = QUICK if args.quick else FULL
    if args.seeds is not None:
        size = dataclasses.replace(size, seeds=args.seeds)
    base = str((ROOT / args.base).resolve()) if not Path(args.base).is_absolute() else args.base
    work, results_dir = Path(args.work).resolve(), Path(args.results).resolve()
    started = time.perf_counter()

    from minipt.checkpoint import load_model
    from minipt.tokenizer import load_tokenizer
    import torch
    torch.set_num_threads(args.threads)
    n_params = sum(p.numel() for p in load_model(base, dtype=torch.bfloat16).parameters())
    folders = write_tasks(work, size, load_tokenizer(base))
    test_sets = {t: [json.loads(line) for line in open(f / "test.jsonl", encoding="utf-8")]
                 for t, f in folders.items()}
    runs = plan(experiments, size, methods)
    for run in runs:
        if run.settings["method"] in lrs:
            run.settings["lr"] = lrs[run.settings["method"]]
    print(f"{len(runs)} training runs in {work / 'runs'}; "
          f"{sum((work / 'runs' / r.name / 'result.json').exists() for r in runs)} already done", flush=True)

    results = {}
    for i, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        r = train(run, base, folders[run.task], work, args.threads)
        results[run.name] = r
        print(f"[{i:3d}/{len(runs)}] {run.name:42s} accuracy {pct(r['accuracy'])} % "
              f"(zero-shot {pct(r['zero_shot'])} %)  {time.perf_counter() - t0:5.0f} s  "
              f"elapsed {(time.perf_counter() - started) / 60:5.1f} min", flush=True)

    commit, dirty = git_commit()
    report = dict(command=" ".join(["python", "bench/experiments.py"] + argv), commit=commit, dirty=dirty,
                  machine=machine(), threads=args.threads, wall_seconds=0.0, base=args.base,
                  base_parameters=n_params, size=dataclasses.asdict(size), method_settings=METHODS)
    if "methods" in experiments:
        report["methods"], report["runs"] = methods_rows(results, size, methods, n_params, test_sets)
    if "init" in experiments:
        report["init"] = init_rows(results, size)
    if "length" in experiments:
        report["length"] = length_rows(results, size)
    if "ensemble" in experiments:
        print("ensemble ...", flush=True)
        report["ensemble"] = ensemble_result(results, size, base, work, test_sets["sentiment"])
    if "interpretation" in experiments:
        report["interpretation"] = interpretation_result(size, base, work)
    report["wall_seconds"] = time.perf_counter() - started

    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (results_dir / "results.md").write_text(markdown(report))
    written = plots(report, results_dir)
    print(f"\n{markdown(report)}")
    print(f"wrote {results_dir}: results.json, results.md{''.join(', ' + w for w in written)} "
          f"in {report['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
