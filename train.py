"""Train a prompt-learning method on a task — minipt's main job.

    python train.py                                    # 20-token soft prompt, sentiment, SmolLM2
    python train.py config/boolq_prefix.py --steps=300
    torchrun --nproc_per_node=2 train.py --batch_size=16
    torchrun --nproc_per_node=2 train.py --shard=fsdp   # each rank holds half the frozen base

The story: read the config, load the frozen base, measure it zero-shot, attach the method,
train it (logging, validating and checkpointing as it goes), measure it again, and leave
behind the prompt file, `config.json`, `metrics.jsonl` and `plot.png` in `out_dir`.

Bad input (a config value, a data file, a base directory, a prompt file) stops the run
before anything is written, with one line `error: ...` naming the cause and exit status 1.
A run in `out_dir` is continued with `--resume` or replaced with `--overwrite`, never
silently. A non-finite loss or gradient, or an out-of-memory, stops the run and names the
step, leaving the last checkpoint as it was.
"""
import dataclasses
from contextlib import contextmanager, nullcontext
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from minipt.checkpoint import build_model, check_checkpoint, load_base, resolve_dtype
from minipt.data import Batches, TruncationWarning, collate, encode_text
from minipt.devices import check_device
from minipt.evaluation import evaluate_generation, rank_classify
from minipt.fileio import atomic_write
from minipt.progress import Progress
from minipt.prompts import PromptConfig, attach, init_from, method_class, save
from minipt.prompts.adapter import adapted_layers
from minipt.prompts.files import base_fingerprint, check_fingerprint, checkpoint_fingerprint, read_prompt
from minipt.prompts.lora import find_targets
from minipt.quantized import check_quant, weight_bytes
from minipt.sharding import average_gradients, shard_frozen_base
from minipt.tasks import load_task
from minipt.train_config import help_text, parse_train_config
from minipt.training import (MetricsLog, all_sum, lr_at, make_optimizer, peak_rss_gb, plot_metrics,
                             read_checkpoint, restore_checkpoint, save_checkpoint, setup_distributed)

# what a run leaves in out_dir
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl", "prompt.safetensors", "plot.png")


def main(argv=None):
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        train(sys.argv[1:] if argv is None else argv)


def train(argv):
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return
    with bad_input_exits():
        cfg = parse_train_config(argv)
        out = Path(cfg.out_dir)
        check_device_and_out_dir(cfg, out)
        rank, world, device = setup_distributed(cfg.device)
        main_process = rank == 0
        say = print if main_process else (lambda *a, **k: None)
        warnings.simplefilter("once" if main_process else "ignore", TruncationWarning)
        torch.manual_seed(cfg.seed)

        # -- everything checked before the base loads: its config, tokenizer and weights file,
        #    the task's rows, the prompt file to start from --
        model_config, tok = check_checkpoint(cfg.base)
        check_quant(cfg.base, cfg.base_quant, model_config)
        task = load_task(cfg.data, seed=cfg.seed)
        check_task(cfg, task, tok, model_config, world)
        check_shard(cfg, model_config, world)
        resumed = read_checkpoint(out / "checkpoint.pt") if cfg.resume else None
        if cfg.init_from:
            with bad_input_exits("init_from: "):
                check_init_from(cfg, tok)

        # -- the frozen base model --
        # a method that trains the base's weights keeps fp32 master weights
        trains_base = method_class(cfg.method).trains_base
        frozen = resolve_dtype(cfg.dtype, device)
        base, tok = load_base(cfg.base, dtype=torch.float32 if trains_base else getattr(torch, frozen),
                              device=device, quant=cfg.base_quant)
        if cfg.dtype == "auto" and not trains_base:
            say(f"dtype=auto: {frozen} on this {device}")
        if cfg.base_quant != "none":
            held, fp32 = weight_bytes(base)
            say(f"base_quant={cfg.base_quant}: the base's weights take {held / 2**20:.0f} MB "
                f"({held / fp32:.2f}x their {fp32 / 2**20:.0f} MB in fp32)")
        is_t5 = base.config.model_type == "t5"
    template = cfg.template or task.template
    train_rows, test_rows = task.splits["train"], task.splits["test"]
    valid_rows = task.splits["validation"][:cfg.eval_examples]
    metric = "accuracy" if task.labels else "rougeL"
    sharded = cfg.shard == "fsdp"
    evaluates = main_process or sharded  # a sharded model's forward is collective: every rank runs it

    def evaluate(model, rows, what):
        progress = Progress(what) if main_process else None
        if task.labels:
            return rank_classify(model, tok, rows, template, task.labels, progress=progress)[0]
        return evaluate_generation(model, tok, rows, template, max_new_tokens=64, progress=progress)["rougeL"]

    say(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    say(f"task {task.name}: {len(train_rows)} train / {len(valid_rows)} validation / {len(test_rows)} test, "
        f"metric {metric}")
    # before attach: LoRA changes the base. A resumed run measured it before it stopped
    # (minutes on a big base); checkpoints older than this key measure it again.
    zero_shot = resumed.get("zero_shot") if resumed else None
    if main_process and zero_shot is not None:
        say(f"zero-shot test {metric}: {zero_shot:.4f} (from the checkpoint)")
    elif main_process:
        zero_shot = evaluate(base, test_rows, "zero-shot test")
        say(f"zero-shot test {metric}: {zero_shot:.4f}")

    # -- attach the method; only its parameters train, in fp32 --
    model = attach(base, PromptConfig(**cfg.method_fields()), tok)
    if cfg.init_from:  # prompt transfer: begin where a prompt for another task ended
        with bad_input_exits("init_from: "):
            init_from(model, cfg.init_from, tok)
    model.base.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        model.base.compile_layers()  # compiles at the first step
    params = model.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    say(f"method {cfg.method}: {model.num_trainable():,} trainable parameters "
        f"({model.method.describe_count()})")
    optimizer = make_optimizer(cfg, params)
    batches = Batches(len(train_rows), cfg.batch_size * cfg.grad_accum, cfg.seed,
                      lengths=[len(r["input"]) for r in train_rows], bucket_batches=cfg.bucket_batches)
    start = 0
    if resumed:
        with bad_input_exits(f"{out / 'checkpoint.pt'}: "):
            start = restore_checkpoint(resumed, model, optimizer, batches)
        say(f"resumed from {out / 'checkpoint.pt'} at step {start}")
    last_saved = start  # the step of the checkpoint on disk (0: none)
    if main_process:
        take_over_out_dir(out, cfg)
        saved_config = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(saved_config))
        log = MetricsLog(out / "metrics.jsonl", keep_until_step=start if cfg.resume else None)
    fingerprint = None
    if sharded:
        fingerprint = base_fingerprint(model.base, tok)  # of the whole embedding, while one rank has it
        held, whole = shard_frozen_base(model, device)
        print(f"fsdp: rank {rank} holds {held:,} of {whole:,} frozen weight bytes", flush=True)
    ddp = DistributedDataParallel(model) if world > 1 and not sharded else model

    # -- the loop --
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    t_start, seen_tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        model.train()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # this rank's share of the global batch, as grad_accum micro-batches
        rows = [train_rows[i] for i in Batches.shard(next(batches), rank, world)]
        micro = [collate(rows[i::cfg.grad_accum], tok, template, cfg.max_len, is_t5, pad, eos=not task.labels)
                 for i in range(cfg.grad_accum)]
        # counted on the host, before the batches move: no wait for the device per micro-batch
        n_mb = [int((mb["targets"] != -100).sum()) for mb in micro]
        real_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
        micro = [{k: v.to(device) for k, v in mb.items()} for mb in micro]
        n_targets = all_sum(sum(n_mb), world, device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once a step, not per micro-batch
        done = step + 1
        try:
            for i, mb in enumerate(micro):
                with ddp.no_sync() if ddp is not model and i < len(micro) - 1 else nullcontext():
                    _, loss = ddp(mb["input_ids" if is_t5 else "idx"], mb["targets"],
                                  attention_mask=mb["attention_mask"], loss_only=True)
                    # a sum over this rank's target tokens / the global count: the ranks' gradient
                    # average (DDP's, or average_gradients') then equals the gradient of the mean
                    # loss over the whole global batch
                    (loss * n_mb[i] * world / n_targets).backward()
                loss_sum += loss.detach().double() * n_mb[i]
            if sharded:
                average_gradients(params, world)
            seen_tokens += real_tokens
        except RuntimeError as e:  # torch.OutOfMemoryError is one; the CPU allocator raises a plain one
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            rows_each = micro[0]["targets"].shape[0]
            sys.exit(f"error: out of memory at step {done} on micro-batches of {rows_each} rows; "
                     f"{smaller_pieces(cfg, world)}; {kept(out, last_saved)}")
        loss = all_sum(loss_sum, world, device) / n_targets
        if not math.isfinite(loss):  # every rank sees the same sum, so all stop here together
            sys.exit(f"error: loss is {loss} at step {done}, stopped before the update; "
                     f"{kept(out, last_saved)}")
        # a finite loss can still have inf/NaN gradients (an overflow in backward), which the
        # update would spread into every trained parameter; with max_norm inf the norm only measures
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        if not math.isfinite(norm):
            sys.exit(f"error: gradient norm is {norm} at step {done}, stopped before the update; "
                     f"{kept(out, last_saved)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if main_process and (done % cfg.log_interval == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - t_start
            tok_s = seen_tokens * world / elapsed
            eta = elapsed / (done - start) * (cfg.steps - done)
            say(f"step {done:5d}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"ETA {eta:.0f} s")
            log.add(kind="train", step=done, loss=loss, lr=lr, tokens_per_s=tok_s)
        if cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.steps):
            if evaluates:
                value = evaluate(model, valid_rows, f"validation at step {done}")
            if main_process:
                say(f"step {done:5d} | validation {metric} {value:.4f}")
                log.add(kind="valid", step=done, **{metric: value})
            _barrier(world)
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < cfg.steps:
            if main_process:
                save_checkpoint(out / "checkpoint.pt", done, model, optimizer, batches, zero_shot)
            last_saved = done
            _barrier(world)
    train_seconds = time.perf_counter() - t_start

    # -- the result --
    if not evaluates:
        return
    tuned = evaluate(model, test_rows, "test")
    if not main_process:
        return
    log.add(kind="test", step=cfg.steps, **{metric: tuned, "zero_shot": zero_shot},
            train_seconds=train_seconds, peak_rss_gb=peak_rss_gb())
    prompt_path = save(model, out / "prompt.safetensors", tok, fingerprint)
    plotted = plot_metrics(log.rows, metric, out / "plot.png")
    width = 26
    print()
    print(f"{'':{width}} {'zero-shot':>10} {'tuned':>10}")
    label = f"test {metric} ({len(test_rows)})"
    print(f"{label:{width}} {_fmt(zero_shot, metric):>10} {_fmt(tuned, metric):>10}")
    print(f"{'trainable parameters':{width}} {model.num_trainable():>21,}")
    print(f"{'training wall time':{width}} {train_seconds:>20.0f}s")
    print(f"{'peak memory (RSS)':{width}} {peak_rss_gb():>19.2f}GB")
    print(f"\nwrote {prompt_path} ({prompt_path.stat().st_size / 1024:.0f} kB), {out / 'metrics.jsonl'}"
          + (f", {out / 'plot.png'}" if plotted else " (no plot: matplotlib is not installed)"))


# ---- refusals ---------------------------------------------------------------------------

@contextmanager
def bad_input_exits(prefix=""):
    """Setup's ValueErrors and missing files carry a one-line message naming the cause: end
    the run with it (exit status 1), without a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {prefix}{e}")


def check_device_and_out_dir(cfg, out: Path) -> None:
    check_device(cfg.device, f"device={cfg.device!r}", "--device=cpu")
    check_writable(out)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out}: holds an earlier run ({', '.join(earlier)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    saved = out / "config.json"
    if cfg.resume and saved.exists():
        # what decides the prompt's shape, its data and its optimizer state; the schedule, the
        # intervals and the device may change
        must_match = [f.name for f in dataclasses.fields(PromptConfig)]
        must_match += ["base", "data", "template", "optimizer"]
        try:
            before = json.loads(saved.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{saved}:{e.lineno}: invalid JSON ({e.msg})") from None
        now = dataclasses.asdict(cfg)
        for key in must_match:
            if key in before and before[key] != now[key]:
                raise ValueError(f"{saved}: the run being resumed has {key}={before[key]!r}, "
                                 f"this one {now[key]!r}; "
                                 f"resume with the same {key}, or start again with --overwrite")


def check_writable(out: Path) -> None:
    """out_dir must be a directory this run can create files in: tried with a directory made
    and removed in its nearest existing ancestor, so that nothing is left behind."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == out else f" ({existing} is)"
        raise ValueError(f"out_dir={str(out)!r}: a file, not a directory{where}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".minipt-write-test-"))
    except OSError as e:
        raise ValueError(f"out_dir={str(out)!r}: cannot create files in {existing} ({e.strerror})") from None


def check_init_from(cfg, tok) -> None:
    """The prompt file to start from must be this method's, in this shape, for this base."""
    meta, _ = read_prompt(cfg.init_from)
    check_fingerprint(cfg.init_from, meta, checkpoint_fingerprint(cfg.base, tok))
    saved = meta["config"]
    if saved["method"] != cfg.method:
        raise ValueError(f"{cfg.init_from}: a {saved['method']} prompt cannot initialise {cfg.method}")
    # what the file's values replace
    starting_point = ("init", "init_text", "init_labels", "seed", "lora_dropout")
    for key, value in cfg.method_fields().items():
        if key not in starting_point and key in saved and saved[key] != value:
            raise ValueError(f"{cfg.init_from}: saved with {key}={saved[key]!r}, this run has {value!r}")


def check_task(cfg, task, tok, model_config, world: int) -> None:
    """Refuse data the loop would trip over later: too few rows, labels that rank
    classification cannot tell apart, sequences the model's context cannot hold, a
    starting text with no tokens, more adapter layers than the base has."""
    n_train, batch = len(task.splits["train"]), cfg.batch_size * cfg.grad_accum
    sizes = ", ".join(f"{len(rows)} {split}" for split, rows in task.splits.items())
    if n_train < batch:
        raise ValueError(f"{cfg.data}: the train split has {n_train} rows ({sizes}), "
                         f"fewer than one batch of {batch}; "
                         "lower batch_size or give more rows")
    for split in ("validation", "test") if cfg.eval_interval else ("test",):
        if not task.splits[split]:
            raise ValueError(f"{cfg.data}: the {split} split is empty ({sizes}); "
                             "give more rows or the splits as files")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} does not split evenly over {world} ranks")
    seen = {}
    for label in task.labels or []:
        ids = tuple(encode_text(tok, label))
        if ids in seen:
            raise ValueError(f"{cfg.data}: labels {seen[ids]!r} and {label!r} are the same tokens "
                             f"{list(ids)}; "
                             "rank classification could not tell them apart")
        seen[ids] = label
    if "init_text" in cfg.method_fields() and not encode_text(tok, cfg.init_text):
        raise ValueError(f"init_text={cfg.init_text!r}: no tokens to start the prompt from")
    if "adapter_layers" in cfg.method_fields():
        adapted_layers(cfg.adapter_layers, model_config.n_decoder_layer if model_config.model_type == "t5"
                       else model_config.n_layer)
    if "lora_targets" in cfg.method_fields():
        with torch.device("meta"):     # the layers by name, nothing allocated
            find_targets(build_model(model_config), cfg.lora_targets)
    if cfg.compile and model_config.model_type != "gpt":
        raise ValueError(f"compile=true: compiled blocks are for decoder models; "
                         f"{cfg.base} is {model_config.model_type}")
    if model_config.model_type == "gpt":
        virtual = method_class(cfg.method).virtual_positions(cfg)
        if cfg.max_len + virtual > model_config.max_seq_len:
            raise ValueError(f"max_len={cfg.max_len} + num_virtual_tokens={virtual} = "
                             f"{cfg.max_len + virtual} positions, more than the base model's context of "
                             f"{model_config.max_seq_len}; lower one of them")


def check_shard(cfg, model_config, world: int) -> None:
    """--shard=fsdp splits the frozen base over torchrun's ranks, block by block: it needs
    several ranks and a decoder model's blocks."""
    if cfg.shard != "fsdp":
        return
    if model_config.model_type != "gpt":
        raise ValueError(f"shard=fsdp: sharded blocks are for decoder models; {cfg.base} is "
                         f"{model_config.model_type} (use shard=none)")
    if world < 2:
        raise ValueError("shard=fsdp: this run is one process; launch it with "
                         "torchrun --nproc_per_node=N (N >= 2) to shard the base over N ranks")


def take_over_out_dir(out: Path, cfg) -> None:
    """Make out_dir this run's: remove an earlier run's files (--overwrite) and temporary files
    that a killed write left behind."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if cfg.overwrite:
            (out / name).unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink()


def smaller_pieces(cfg, world: int) -> str:
    """Out-of-memory advice: the same global batch, half of it in memory at a time."""
    if cfg.batch_size % (2 * world) == 0:
        return (f"try --batch_size={cfg.batch_size // 2} --grad_accum={cfg.grad_accum * 2} "
                "(the same batch in halves)")
    return "try --grad_checkpointing=true or a shorter --max_len"


def kept(out: Path, last_saved: int) -> str:
    if last_saved:
        return f"{out / 'checkpoint.pt'} (step {last_saved}) is the last good checkpoint"
    return "no checkpoint was written"


def _fmt(value, metric):
    return f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.4f}"


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
