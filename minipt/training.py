"""The pieces of the training loop that `train.py` tells as a story: optimizer and learning
-rate schedule, data-parallel setup, resumable checkpoints, the metrics log and its plot.

Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`, and are written to a temporary file then renamed: a crash
mid-write leaves the previous checkpoint intact.
"""
import json
import math
import os
import random
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from .devices import check_device
from .fileio import atomic_write
from .tensorfile import load_pickle


# ---- optimizer and schedule -----------------------------------------------------------------

def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        # Lester et al. 2021 (§3): Adafactor, lr 0.3, weight decay 1e-5, beta2 decay exponent 0.8,
        # no parameter scaling (torch's Adafactor has none)
        return torch.optim.Adafactor(params, lr=cfg.lr, beta2_decay=-0.8, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.optimizer!r} unknown; choose adamw or adafactor")


def lr_at(step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then constant, linear or cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule {cfg.schedule!r} unknown; choose constant, linear or cosine")


# ---- data parallel --------------------------------------------------------------------------

def setup_distributed(device: str):
    """(rank, world_size, device): (0, 1, device) unless launched by torchrun, which sets
    RANK, WORLD_SIZE and LOCAL_RANK. There each rank takes its own GPU, cuda:LOCAL_RANK, and
    the ranks reduce over NCCL; CPU ranks over gloo."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device.startswith("cuda")
    if cuda:
        if world > 1:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}"
            check_device(device, f"LOCAL_RANK={local_rank}: {device}", "--device=cpu")
        if torch.device(device).index is not None:
            torch.cuda.set_device(device)  # what a bare "cuda" and NCCL's buffers mean from here on
        # TF32 for fp32 matmuls and convolutions on CUDA, the one place it is set: several times
        # fp32's rate on Ampere and later (inputs rounded to 10 mantissa bits, fp32 sums), off in
        # PyTorch by default. It changes fp32 products only: an fp32 run's, and the fp32 method
        # parameters' (LoRA, P-tuning's encoder) beside a bf16 base.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, device


def all_sum(x, world: int, device="cpu") -> float:
    """x (a number or a one-element tensor) summed over the ranks. The sum is taken on the
    training device, NCCL's only kind, in float64 (exact for token counts)."""
    if world == 1:
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=device).reshape(1)
    dist.all_reduce(t)
    return t.item()


# ---- checkpoints ----------------------------------------------------------------------------

def save_checkpoint(path: Path, step: int, model, optimizer, batches, zero_shot=None) -> None:
    state = {
        "step": step,
        "zero_shot": zero_shot,  # the base's test score, so a resumed run need not measure it again
        "method": model.method.state_for_saving(),
        "optimizer": optimizer.state_dict(),
        "batches": batches.state(),
        "torch_rng": torch.get_rng_state(),
        # dropout on a GPU draws from that device's generator, not the CPU's
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path) -> dict:
    """What save_checkpoint wrote, unpickled with weights_only=True: a file that would build
    any other object (and so could run code) is refused, not loaded."""
    try:
        # mapped: a full fine-tuning checkpoint (7.5 GB for Qwen2.5) stays file cache the
        # kernel can drop, not memory of the process's own beside what it restores (peak
        # RSS still counts the pages read)
        state = load_pickle(path, mapped=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no checkpoint to resume from") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    missing = {"step", "method", "optimizer", "batches", "torch_rng", "python_rng"} - set(state)
    if missing:
        raise ValueError(f"{path}: not a minipt checkpoint (no {', '.join(sorted(missing))})")
    return state


def restore_checkpoint(state: dict, model, optimizer, batches) -> int:
    """Put a read checkpoint back in place; return the step to continue from."""
    model.method.load_saved(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available():  # checkpoints before "cuda_rng", or from a CPU run, have none
        for i, rng in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, i)
    random.setstate(state["python_rng"])
    return state["step"]


# ---- metrics ----------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per event (train / valid / test), appended as it happens."""

    def __init__(self, path: Path, keep_until_step=None):
        self.path = path
        rows = []
        if keep_until_step is not None and path.exists():  # resuming: drop what came after the checkpoint
            lines = path.read_text().splitlines()
            rows = [json.loads(line) for line in lines[:-1]]
            try:
                rows += [json.loads(lines[-1])] if lines else []
            except json.JSONDecodeError:
                pass  # a line cut short by a kill mid-append
            rows = [r for r in rows if r.get("step", 0) <= keep_until_step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        self.rows = rows

    def add(self, **row) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB


def plot_metrics(rows: list, metric: str, path: Path) -> bool:
    """Training loss and validation metric against steps, side by side. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    valid = [(r["step"], r[metric]) for r in rows if r["kind"] == "valid"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax1.plot(*zip(*train), color="tab:blue")
    ax1.set(xlabel="step", ylabel="training loss", title="training loss")
    if valid:
        ax2.plot(*zip(*valid), marker="o", color="tab:orange")
    ax2.set(xlabel="step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True
