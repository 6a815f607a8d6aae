"""Method for method against peft (issue #19): peft's version of each minipt method, trained
by train.py's loop on transformers' SmolLM2, and a table of the two side by side.

    # one peft run (skipped if DIR/result.json exists, so a sweep resumes where it stopped)
    python bench/peft_methods.py --task sentiment --method prefix_tuning --seed 0 --steps 200 \\
        --out RUNS/peft/sentiment-prefix_tuning-s0
    # the matching minipt run: prints the train.py command with exactly the same settings
    python bench/peft_methods.py --minipt-command --task sentiment --method prefix_tuning --seed 0 \\
        --steps 200 --out RUNS/minipt/sentiment-prefix_tuning-s0
    # the table: task, method, minipt and peft test accuracy (mean over seeds), zero-shot, seeds
    python bench/peft_methods.py --table RUNS [MORE_RUNS ...]
    # smoke check: 3 steps, 16 test rows, one thread
    python bench/peft_methods.py --task topic --method adapter --steps 3 --test-rows 16 --threads 1 \\
        --out /tmp/x

Directory layout (a convention; `--table` finds runs by their files, in any sub-folder):

    RUNS/minipt/{task}-{method}-s{seed}/   train.py's out_dir: config.json, metrics.jsonl
                                           (its last row, kind "test": accuracy, zero_shot)
    RUNS/peft/{task}-{method}-s{seed}/     this script's --out: result.json ("side": "peft")

The same harness. Every setting comes from `parse_train_config(minipt_argv(...))`, the very
call train.py makes with the printed command line, so nothing can drift: the method's recipe
(each method class's recipe(): lr, warm-up, adapter layers), batch size, steps, linear schedule
(`lr_at`), AdamW with weight decay (`make_optimizer`), grad clip, max_len, the seed; the
batches are train.py's (`Batches` seeded by the seed with its `bucket_batches`, collated by
minipt's `collate` with minipt's tokenizer, so both sides see the same token ids in the same
order); the loss is the mean cross-entropy on the label token (bench.peft_loss); the test
split is rank-classified as minipt does (every label one token, read at the prompt's last
position; bench.peft_rank_accuracy). The sizes of each method (virtual tokens, P-tuning's
encoder, the prefix MLP, the adapter's layers, LoRA's rank, alpha, targets) are read from
the same TrainConfig.

Where the two sides differ, on purpose (peft as peft ships it):
  - dtype: peft runs fp32 (weights and all); minipt trains its method in fp32 on bf16
    frozen weights (train.py's default dtype).
  - initialisation: peft has a text init for prompt tuning only (used here, with minipt's
    text). minipt starts every prompt method from the text (init="text"): P-tuning as the
    text's embeddings plus a zero-started encoder (peft: N(0, 1) embedding, random encoder,
    no residual), prefix tuning / P-tuning v2 from the KV cache of the text (peft: N(0, 1)
    table or embedding), the adapter from what its layers read (peft: N(0, 1) prompt).
  - prefix MLP input: peft narrows the embedding to the kv width for grouped-query models
    (SmolLM2: 3 kv heads x 64 = 192), minipt keeps d_model (576).
  - adapter gate: peft has one scalar gate per layer, minipt one per head (both zero at start).
"""
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
from bench import (cpu_name, load_tokenizer_only, peak_rss_gb, peft_loss, peft_rank_accuracy,  # noqa: E402
                   recipe_steps)
from minipt.train_config import TrainConfig, parse_train_config  # noqa: E402
from minipt.data import Batches, collate  # noqa: E402
from minipt.fetch import fetch  # noqa: E402
from minipt.prompts.adapter import adapted_layers  # noqa: E402
from minipt.tasks import BUILTIN, load_task  # noqa: E402
from minipt.fileio import atomic_write  # noqa: E402
from minipt.training import lr_at  # noqa: E402

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter", "lora")
TASKS = ("sentiment", "topic")

# The text every text-initialised method starts from: the task's instruction, which train.py
# takes for an empty init_text (tasks.BUILTIN). peft uses it for prompt tuning only.
INIT_TEXT = {task: BUILTIN[task][4] for task in TASKS}

# Positions that peft puts in front of the text in its *logits* (and, for the loss, in front
# of `labels`): prompt tuning and P-tuning feed the virtual tokens as input embeddings, so
# the logits are (B, P + T, V) and the text's position t is column P + t; prefix tuning /
# P-tuning v2 put them in every layer's past keys and values, and the adaption prompt in a
# side attention, so their logits are (B, T, V), like LoRA's. bench.peft_loss prepends that
# many -100 to the already-shifted labels, and bench.peft_rank_accuracy reads the label
# scores at column n + (prompt length - 1) of right-padded rows. `check_virtual_positions`
# measures the offset on the first batch before training and refuses a mismatch.
LOGIT_OFFSET = {"prompt_tuning": "P", "p_tuning": "P", "prefix_tuning": 0, "p_tuning_v2": 0, "adapter": 0,
                "lora": 0}


def minipt_argv(task: str, method: str, seed: int, steps: int) -> list:
    """The train.py arguments of the minipt run; parse_train_config of them is both sides' config."""
    argv = [f"--method={method}", f"--data={task}", f"--seed={seed}", f"--steps={steps}"]
    return argv


def train_config(task: str, method: str, seed: int, steps: int) -> TrainConfig:
    return parse_train_config(minipt_argv(task, method, seed, steps))


def minipt_command(task, method, seed, steps, out) -> str:
    # eval/checkpoint intervals only save time: they do not change what is trained
    argv = minipt_argv(task, method, seed, steps) + ["--eval_interval=0", "--ckpt_interval=0",
                                                     f"--out_dir={out}"]
    return " ".join(shlex.quote(a) for a in ["python", "train.py", *argv])


def peft_config(method: str, cfg: TrainConfig, n_layers: int):
    from peft import (AdaptionPromptConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig, PromptTuningInit, TaskType)
    P, causal = cfg.num_virtual_tokens, TaskType.CAUSAL_LM
    if method == "prompt_tuning":
        gguf = fetch("smollm2-gguf")   # peft's own text init, through the GGUF's tokenizer (minipt's ids)
        return PromptTuningConfig(task_type=causal, num_virtual_tokens=P,
                                  prompt_tuning_init=PromptTuningInit.TEXT,
                                  prompt_tuning_init_text=cfg.init_text,
                                  tokenizer_name_or_path=str(gguf.parent),
                                  tokenizer_kwargs={"gguf_file": gguf.name})
    if method == "p_tuning":           # peft's encoder: 2-layer BiLSTM + MLP, as minipt's (no residual)
        return PromptEncoderConfig(task_type=causal, num_virtual_tokens=P,
                                   encoder_reparameterization_type=cfg.encoder_type.upper(),
                                   encoder_hidden_size=cfg.encoder_hidden)
    if method in ("prefix_tuning", "p_tuning_v2"):
        projection = cfg.prefix_projection if cfg.prefix_projection is not None else method == "prefix_tuning"
        return PrefixTuningConfig(task_type=causal, num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=cfg.projection_hidden if projection else None)
    if method == "adapter":
        return AdaptionPromptConfig(task_type=causal, adapter_len=P,
                                    adapter_layers=adapted_layers(cfg.adapter_layers, n_layers))
    if method == "lora":
        return LoraConfig(task_type=causal, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
    raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")


def logit_offset(method: str, cfg: TrainConfig) -> int:
    return cfg.num_virtual_tokens if LOGIT_OFFSET[method] == "P" else LOGIT_OFFSET[method]


@torch.no_grad()
def check_virtual_positions(model, batch, expected: int, method: str) -> None:
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["idx"][:2], attention_mask=batch["attention_mask"][:2]).logits
    model.train(was_training)
    found = logits.size(1) - batch["idx"].size(1)
    if found != expected:
        raise SystemExit(f"error: peft {method} puts {found} positions before the text in its logits, "
                         f"this script assumes {expected} (LOGIT_OFFSET)")


# --------------------------------------------------------------------------- one run

def run(args) -> dict:
    from peft import __version__ as peft_version
    from peft import get_peft_model
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = train_config(args.task, args.method, args.seed, args.steps)
    torch.manual_seed(cfg.seed)                                    # as train.py, before anything is built
    task = load_task(cfg.data, seed=cfg.seed)
    template = cfg.template or task.template
    train_rows = task.splits["train"]
    test_rows = task.splits["test"][:args.test_rows] if args.test_rows else task.splits["test"]
    tok = load_tokenizer_only()
    gguf = fetch("smollm2-gguf")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    n_layers = hf.config.num_hidden_layers

    zero_shot = None
    if not args.no_zero_shot:   # the base alone, before peft wraps it (LoRA changes it in place)
        t0 = time.perf_counter()
        zero_shot = peft_rank_accuracy(hf, tok, test_rows, template, task.labels, 0)
        say(f"zero-shot test accuracy {zero_shot:.4f} "
            f"({len(test_rows)} rows, {time.perf_counter() - t0:.0f} s)")

    pcfg = peft_config(args.method, cfg, n_layers)
    torch.manual_seed(cfg.seed)                                    # peft's random init follows the seed
    model = get_peft_model(hf, pcfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_virtual = logit_offset(args.method, cfg)
    trainable = sum(p.numel() for p in params)
    say(f"peft {args.method}: {trainable:,} trainable parameters; lr {cfg.lr}, warm-up {cfg.warmup_steps}, "
        f"{cfg.steps} steps of {cfg.batch_size}; {n_virtual} virtual positions in the logits")

    batches = Batches(len(train_rows), cfg.batch_size * cfg.grad_accum, cfg.seed,
                      lengths=[len(r["input"]) for r in train_rows], bucket_batches=cfg.bucket_batches)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    make_batch = lambda: collate([train_rows[i] for i in next(batches)], tok, template, cfg.max_len, False,
                                 pad, eos=not task.labels)

    def first_checked():
        """The batch, and on the first one the virtual positions measured (see LOGIT_OFFSET)."""
        batch = make_batch()
        if not losses:
            check_virtual_positions(model, batch, n_virtual, args.method)
        return batch

    losses, step_seconds = [], []
    for done, loss, seconds in recipe_steps(cfg, params, lambda b: peft_loss(model, b, n_virtual),
                                            first_checked):
        step_seconds.append(seconds)
        losses.append(loss)
        if done % cfg.log_interval == 0 or done == cfg.steps or done <= 3:
            say(f"step {done:4d}/{cfg.steps} | loss {loss:.4f} | lr {lr_at(done - 1, cfg):.2e} | "
                f"{seconds:.2f} s")
    train_seconds = sum(step_seconds)

    t0 = time.perf_counter()
    accuracy = peft_rank_accuracy(model, tok, test_rows, template, task.labels, n_virtual)
    say(f"test accuracy {accuracy:.4f} ({len(test_rows)} rows, {time.perf_counter() - t0:.0f} s)")
    return {"side": "peft", "task": args.task, "method": args.method, "seed": args.seed, "steps": cfg.steps,
            "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
            "accuracy": accuracy, "zero_shot": zero_shot, "test_rows": len(test_rows),
            "test_rows_all": len(task.splits["test"]),
            "train_seconds": train_seconds, "step_seconds_median": statistics.median(step_seconds),
            "losses": losses, "trainable": trainable, "virtual_positions_in_logits": n_virtual,
            "peak_rss_gb": peak_rss_gb(), "dtype": "float32", "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "peft": peft_version, "transformers": transformers.__version__, "torch": torch.__version__,
            "minipt_argv": minipt_argv(args.task, args.method, args.seed, args.steps),
            "peft_config": json.loads(json.dumps(pcfg.to_dict(), default=str))}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the table

def read_runs(dirs) -> list:
    """Every finished run under dirs: minipt's (config.json + metrics.jsonl with a test row)
    and this script's (result.json with "side": "peft"), as flat dicts."""
    runs = []
    for d in dirs:
        for metrics in sorted(Path(d).rglob("metrics.jsonl")):
            try:
                cfg = json.loads((metrics.parent / "config.json").read_text())
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            except (OSError, json.JSONDecodeError) as e:
                say(f"skipped {metrics.parent}: {e}")
                continue
            test = [r for r in rows if r.get("kind") == "test"]
            if not test or "accuracy" not in test[-1]:
                say(f"skipped {metrics.parent}: no test accuracy (unfinished run?)")
                continue
            runs.append({"side": "minipt", "task": Path(cfg["data"]).stem, "method": cfg["method"],
                         "seed": cfg["seed"], "steps": cfg["steps"], "accuracy": test[-1]["accuracy"],
                         "zero_shot": test[-1].get("zero_shot"), "partial": False,
                         "path": str(metrics.parent)})
        for result in sorted(Path(d).rglob("result.json")):
            try:
                r = json.loads(result.read_text())
            except (OSError, json.JSONDecodeError) as e:
                say(f"skipped {result}: {e}")
                continue
            if r.get("side") != "peft":       # e.g. bench/experiments.py's result.json in a minipt folder
                continue
            runs.append({**{k: r[k]
                            for k in ("side", "task", "method", "seed", "steps", "accuracy", "zero_shot")},
                         "partial": r["test_rows"] < r.get("test_rows_all", r["test_rows"]),
                         "path": str(result.parent)})
    return runs


def mean_std(values) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table(runs) -> str:
    """Markdown: one row per (task, method, steps), each side's mean test accuracy over its seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"], r["steps"]),
                          {"minipt": [], "peft": []})[r["side"]].append(r)
    order = lambda key: (key[0], METHODS.index(key[1]) if key[1] in METHODS else len(METHODS), key[1], key[2])
    lines = ["| task | method | steps | minipt accuracy % | peft accuracy % | zero-shot % (minipt / peft) "
             "| seeds (minipt / peft) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    partial = False
    for key in sorted(groups, key=order):
        side = groups[key]
        zs = [f"{100 * statistics.fmean(v):.1f}" if v else "-"
              for v in ([r["zero_shot"] for r in side[s] if r["zero_shot"] is not None]
                        for s in ("minipt", "peft"))]
        star = "*" if any(r["partial"] for r in side["peft"]) else ""
        partial |= bool(star)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     f"{mean_std([r['accuracy'] for r in side['minipt']])} "
                     f"| {mean_std([r['accuracy'] for r in side['peft']])}{star} | {zs[0]} / {zs[1]} "
                     f"| {len(side['minipt'])} / {len(side['peft'])} |")
    if partial:
        lines.append("\n\\* peft evaluated on part of the test split (--test-rows); "
                     "minipt always on all of it.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=TASKS, default="sentiment")
    ap.add_argument("--method", choices=METHODS, default="prompt_tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--out", type=Path, help="the run's folder (result.json)")
    ap.add_argument("--test-rows", type=int, default=None,
                    help="first N test rows only (default: all, as train.py)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the base model's zero-shot evaluation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, as train.py)")
    ap.add_argument("--minipt-command", action="store_true",
                    help="print the train.py command of the matching minipt run (--out is its out_dir) "
                         "and exit")
    ap.add_argument("--table", nargs="+", type=Path, metavar="RUNS_DIR",
                    help="print the comparison table and exit")
    args = ap.parse_args(argv)
    if not args.table and args.out is None:
        ap.error("--out is required (or --table)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        runs = read_runs(args.table)
        if not runs:
            raise SystemExit(f"error: no finished runs under {', '.join(map(str, args.table))}")
        print(table(runs))
        return
    if args.minipt_command:
        print(minipt_command(args.task, args.method, args.seed, args.steps, args.out))
        return
    result_path = args.out / "result.json"
    if result_path.exists():
        say(f"{result_path} exists: skipped")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    atomic_write(result_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    say(f"wrote {result_path}")


if __name__ == "__main__":
    main()
