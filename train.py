"""Train a prompt-learning method on a task — minipt's main job.

    python train.py                                    # 20-token soft prompt, sentiment, SmolLM2
    python train.py config/boolq_prefix.py --steps=300
    torchrun --nproc_per_node=2 train.py --batch_size=16

The story: read the config, load the frozen base, measure it zero-shot, attach the method,
train it (logging, validating and checkpointing as it goes), measure it again, and leave
behind the prompt file, `config.json`, `metrics.jsonl` and `plot.png` in `out_dir`.
"""
import dataclasses
from contextlib import nullcontext
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from minipt.checkpoint import load_base
from minipt.config import parse_train_config
from minipt.data import Batches, collate
from minipt.evaluation import evaluate_generation, rank_classify
from minipt.prompts import PromptConfig, attach, init_from, save
from minipt.tasks import load_task
from minipt.training import (MetricsLog, all_sum, load_checkpoint, lr_at, make_optimizer, peak_rss_gb, plot_metrics,
                             save_checkpoint, setup_distributed)


def main(argv=None):
    try:
        cfg = parse_train_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rank, world = setup_distributed(cfg.device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    out = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)

    # -- the frozen base model and the task --
    dtype = torch.float32 if cfg.method == "full" else getattr(torch, cfg.dtype)  # full FT keeps fp32 master weights
    base, tok = load_base(cfg.base, dtype=dtype, device=cfg.device)
    is_t5 = base.config.model_type == "t5"
    task = load_task(cfg.data, seed=cfg.seed)
    template = cfg.template or task.template
    train_rows, valid_rows, test_rows = task.splits["train"], task.splits["validation"][:cfg.eval_examples], task.splits["test"]
    metric = "accuracy" if task.labels else "rougeL"

    def evaluate(model, rows):
        if task.labels:
            return rank_classify(model, tok, rows, template, task.labels, is_t5)[0]
        return evaluate_generation(model, tok, rows, template, max_new_tokens=64, is_t5=is_t5)["rougeL"]

    say(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    say(f"task {task.name}: {len(train_rows)} train / {len(valid_rows)} validation / {len(test_rows)} test, metric {metric}")
    zero_shot = evaluate(base, test_rows) if main_process else None  # before attach: LoRA changes the base
    if main_process:
        say(f"zero-shot test {metric}: {zero_shot:.4f}")

    # -- attach the method; only its parameters train, in fp32 --
    prompt_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PromptConfig)}
    model = attach(base, PromptConfig(**prompt_fields), tok)
    if cfg.init_from:  # prompt transfer: begin where a prompt for another task ended
        try:
            init_from(model, cfg.init_from, tok)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: init_from: {e}")
    model.base.grad_checkpointing = cfg.grad_checkpointing
    params = model.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    say(f"method {cfg.method}: {model.num_trainable():,} trainable parameters ({model.method.describe_count()})")
    optimizer = make_optimizer(cfg, params)
    batches = Batches(len(train_rows), cfg.batch_size * cfg.grad_accum, cfg.seed,
                      lengths=[len(r["input"]) for r in train_rows], bucket_batches=cfg.bucket_batches)
    start = 0
    if cfg.resume:
        start = load_checkpoint(out / "checkpoint.pt", model, optimizer, batches)
        say(f"resumed from {out / 'checkpoint.pt'} at step {start}")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        log = MetricsLog(out / "metrics.jsonl", keep_until_step=start if cfg.resume else None)
    ddp = DistributedDataParallel(model) if world > 1 else model

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
        micro = [{k: v.to(cfg.device) for k, v in mb.items()} for mb in micro]
        n_targets = all_sum(sum(int((mb["targets"] != -100).sum()) for mb in micro), world)
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            n_mb = int((mb["targets"] != -100).sum())
            with ddp.no_sync() if world > 1 and i < len(micro) - 1 else nullcontext():
                _, loss = ddp(mb["input_ids" if is_t5 else "idx"], mb["targets"], attention_mask=mb["attention_mask"],
                              loss_only=True)
                # a sum over this rank's target tokens / the global count: DDP's gradient average
                # then equals the gradient of the mean loss over the whole global batch
                (loss * n_mb * world / n_targets).backward()
            loss_sum += loss.item() * n_mb
            seen_tokens += int(mb["attention_mask"].sum())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = all_sum(loss_sum, world) / n_targets
        done = step + 1

        if main_process and (done % cfg.log_interval == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - t_start
            tok_s = seen_tokens * world / elapsed
            eta = elapsed / (done - start) * (cfg.steps - done)
            say(f"step {done:5d}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta:.0f} s")
            log.add(kind="train", step=done, loss=loss, lr=lr, tokens_per_s=tok_s)
        if cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.steps):
            if main_process:
                value = evaluate(model, valid_rows)
                say(f"step {done:5d} | validation {metric} {value:.4f}")
                log.add(kind="valid", step=done, **{metric: value})
            _barrier(world)
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < cfg.steps:
            if main_process:
                save_checkpoint(out / "checkpoint.pt", done, model, optimizer, batches)
            _barrier(world)
    train_seconds = time.perf_counter() - t_start

    # -- the result --
    if not main_process:
        return
    tuned = evaluate(model, test_rows)
    log.add(kind="test", step=cfg.steps, **{metric: tuned, "zero_shot": zero_shot})
    prompt_path = save(model, out / "prompt.safetensors", tok)
    plotted = plot_metrics(log.rows, metric, out / "plot.png")
    width = 26
    print()
    print(f"{'':{width}} {'zero-shot':>10} {'tuned':>10}")
    print(f"{'test ' + metric + f' ({len(test_rows)})':{width}} {_fmt(zero_shot, metric):>10} {_fmt(tuned, metric):>10}")
    print(f"{'trainable parameters':{width}} {model.num_trainable():>21,}")
    print(f"{'training wall time':{width}} {train_seconds:>20.0f}s")
    print(f"{'peak memory (RSS)':{width}} {peak_rss_gb():>19.2f}GB")
    print(f"\nwrote {prompt_path} ({prompt_path.stat().st_size / 1024:.0f} kB), {out / 'metrics.jsonl'}"
          + (f", {out / 'plot.png'}" if plotted else " (no plot: matplotlib is not installed)"))


def _fmt(value, metric):
    return f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.4f}"


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
