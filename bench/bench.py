"""minipt against transformers + peft on the same weights, in one run.

Both sides read the same GGUF, SmolLM2-135M-Instruct unless `--base` names another of
weights.BASES (gemma3, qwen2.5): minipt through its converted checkpoint in `weights/`, transformers
through `from_pretrained(..., gguf_file=...)`.
Sections (`--only`, comma-separated; default train,generate):

  train     one training step (forward + backward + AdamW step + zero_grad), per `--shapes`:
            `sentiment`, the sentiment task's real batches (batch 16, built by minipt's
            `collate` from the same `Batches` indices, so both sides get the same token ids),
            loss on the label token only; `text-BxT`, the generation shape: B rows of T tokens
            of the xsum task's articles and summaries, loss on every token.
            Soft prompt (20 tokens, text init), P-tuning v2 / prefix without projection (20
            tokens) and LoRA (r 8, alpha 16, q_proj + v_proj). Configurations: minipt bf16 (its
            default: bf16 frozen weights, fp32 method parameters and AdamW state), the same with
            torch.compile'd blocks (`--compile=true`; compiled in the warm-up), peft fp32,
            peft bf16; each runs in its own subprocess, so its peak RSS is its own. Median step
            time, tokens/s (non-pad text tokens / s), peak RSS, MFU (see `train_flops`).
  generate  greedy decoding, 128 new tokens, batch 1 and 8, with the same 20-token soft prompt on
            both sides (minipt `PromptedModel`; transformers `generate` with peft's prompt, see
            `SoftPromptGenerate` for why not peft's own `generate`); bench_generate.py's
            measurement, and whether the tokens are identical; and batch 1 with prompt-lookup
            drafts on both sides (`--gen-lookup`). One table per `--gen-dtypes`,
            both sides in that dtype (fp32: the tokens must be identical; which dtype decodes
            fastest depends on the CPU's one-row kernels: see the README's Benchmarks).
            "float32+packed": minipt decodes from the checkpoint's 4-bit codes (minipt.packed,
            bf16 products), against peft fp32; its tokens may differ from fp32's. "+compiled":
            minipt's one-token step is torch.compile'd (generation.compile_decoding), in the
            warm-up calls; the table gives their time.
  scaling   soft-prompt step time against sequence length and batch size, and peak RSS
            against length (synthetic token batches, loss on every token), minipt bf16
            against peft's faster dtype in the train section (else `--peft-dtype`, default
            fp32); a log-log plot to `--plot`.
  accuracy  time to accuracy: minipt's default `train.py` run against peft running the same
            recipe in fp32 (20 tokens, text init, AdamW 3e-2, warmup + linear decay, clip 1.0,
            200 steps of 16), test accuracy by rank classification every `--eval-every` steps,
            evaluation time off the clock. Long (10-20 min on a quiet machine).

    python bench/bench.py                                    # train + generate
    python bench/bench.py --only train,generate,scaling,accuracy --json bench/results.json
    python bench/bench.py --only scaling --plot bench/scaling.png
    python bench/bench.py --only train --steps 2 --methods prompt_tuning        # smoke check
    python bench/bench.py --only train --shapes text-8x128,text-4x512 --steps 3 --warmup 1
    python bench/bench.py --only scaling --scaling-lengths 64,128 --scaling-batches 1,4 --scaling-steps 1
    python bench/bench.py --only accuracy --accuracy-steps 4 --eval-every 2 --test-rows 64

Threads are torch's defaults (printed with the CPU name). Timed things run one after the
other on purpose; on a shared machine use `--rounds` (train) and `--gen-repeats` (generate).
Internally `--worker KIND` runs one configuration and prints one JSON line.

On a GPU, `--device cuda` puts both sides there (train, generate, scaling, accuracy): every
timer is read after torch.cuda.synchronize(), MFU counts against the GPU's own matmul peak,
and beside peak RSS each configuration reports its peak GPU memory
(torch.cuda.max_memory_allocated, reset when the model is loaded, so weights + activations
+ optimizer state). Where the real weights cannot be fetched, `--random-shape smollm2-135m`
(or qwen2.5-0.5b) gives both sides the same random weights in that model's shape
(bench/random_bases.py), with synthetic token batches: `text-BxT` random tokens, and the
classification shape `cls-BxT` (also available with real weights).

    python bench/bench.py --device cuda --random-shape smollm2-135m --only train \
        --shapes text-8x512,cls-16x64 --configs minipt-bfloat16,peft-bfloat16 --gen-dtypes bfloat16
"""
import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
from bench_generate import BATCH_PROMPTS, PROMPT, bench_case, print_cases, runners  # noqa: E402
from minipt.checkpoint import load_base, resolve_dtype  # noqa: E402
from minipt.train_config import TrainConfig, parse_train_config  # noqa: E402
from minipt.data import Batches, collate, encode_text  # noqa: E402
from minipt.evaluation import rank_classify  # noqa: E402
from minipt.generation import compile_decoding, pad_batch  # noqa: E402
from minipt.packed import pack_for_decoding  # noqa: E402
from minipt.prompts import PromptConfig, attach  # noqa: E402
from minipt.tasks import load_task  # noqa: E402
from minipt.training import lr_at, make_optimizer  # noqa: E402
from weights import BASES, base_gguf  # noqa: E402
import random_bases  # noqa: E402
from bench_generate import sources, sync  # noqa: E402

SECTIONS = ("train", "generate", "scaling", "accuracy")
METHODS = {"prompt_tuning": "soft prompt", "p_tuning_v2": "prefix (v2)", "lora": "LoRA"}
TRAIN_CONFIGS = [("minipt", "bfloat16"), ("minipt-compiled", "bfloat16"), ("peft", "float32"),
                 ("peft", "bfloat16"), ("minipt-plain", "bfloat16")]
# minipt-plain: minipt with its speed layer off (MINIPT_PLAIN=1), the plain code fast.py replaces;
# asked for by name only, to see on a new device whether each of fast.py's paths still wins there
OPT_IN = {"minipt-plain-bfloat16"}
BASE = "smollm2"          # --base: which of weights.BASES both sides load
RANDOM = None             # --random-shape: random weights of that shape instead (random_bases.SHAPES)
DEVICE = "cpu"            # --device
N_VIRTUAL = 20
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ["q_proj", "v_proj"]
DEFAULTS = TrainConfig()               # train.py's defaults: the recipe both sides follow
# "Classify the sentiment of this movie review as positive or negative."
INIT_TEXT = DEFAULTS.init_text


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="train,generate", help=f"sections, from {','.join(SECTIONS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--base", choices=list(BASES), default=BASE, help="the base both sides load")
    ap.add_argument("--random-shape", choices=list(random_bases.SHAPES), default=None,
                    help="random weights in this real model's shape on both sides, instead of --base "
                         "(synthetic batches: text-BxT and cls-BxT shapes)")
    ap.add_argument("--device", default="cpu", help="where both sides run: cpu, cuda, cuda:1, ...")
    # train
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this often, alternating order")
    ap.add_argument("--methods", default=",".join(METHODS), help="train section: from " + ",".join(METHODS))
    ap.add_argument("--shapes", default="sentiment",
                    help="train section: batch shapes, from sentiment, text-BxT (B rows of T tokens, "
                         "loss on every token) and cls-BxT (B random rows of T/4 to T tokens, left padded, "
                         "loss on the last one), comma-separated")
    ap.add_argument("--configs", default=",".join(c for c in (f"{side}-{dtype}" for side, dtype in TRAIN_CONFIGS)
                                                  if c not in OPT_IN),
                    help="train section: which configurations run, comma-separated "
                         "(minipt-plain-bfloat16 too: minipt with MINIPT_PLAIN=1)")
    # generate
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch-sizes", default="1,8")
    ap.add_argument("--gen-dtypes", default=None,
                    help="generate section: one table per dtype, both sides in it "
                         "(default float32,float32+packed+compiled,float16; on CUDA bfloat16,float32) "
                         "(float32, float16, bfloat16); "
                         "+packed: minipt decodes from the checkpoint's 4-bit codes; "
                         "+compiled: its one-token step is compiled")
    ap.add_argument("--gen-lookup", type=int, default=8,
                    help="generate section: also batch 1 with prompt-lookup drafts of this many tokens "
                         "on both sides (minipt generate(lookup=), transformers prompt_lookup_num_tokens); "
                         "0: skip")
    ap.add_argument("--peft-generate", choices=["embeds", "peft"], default="embeds",
                    help="peft side: transformers generate with peft's prompt as input embeddings (default), "
                         "or peft's own generate (see SoftPromptGenerate)")
    # scaling
    ap.add_argument("--scaling-lengths", default="64,128,256,512,1024,2048")
    ap.add_argument("--scaling-batches", default="1,4,16")
    ap.add_argument("--scaling-batch", type=int, default=4, help="the fixed batch of the length sweep")
    ap.add_argument("--scaling-len", type=int, default=128, help="the fixed length of the batch sweep")
    ap.add_argument("--scaling-steps", type=int, default=3, help="timed steps per point (after one warm-up)")
    ap.add_argument("--peft-dtype", choices=["float32", "bfloat16"], default=None,
                    help="peft's dtype for scaling; default: the faster one in the train section, "
                         "else float32")
    ap.add_argument("--plot", type=Path, default=BENCH / "scaling.png")
    # accuracy
    ap.add_argument("--accuracy-steps", type=int, default=DEFAULTS.steps)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--test-rows", type=int, default=None,
                    help="evaluate on the first N test rows (default all 800)")
    # one configuration in a subprocess (used by the sections above)
    ap.add_argument("--worker", choices=["train", "scaling", "accuracy"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=["minipt", "minipt-compiled", "minipt-plain", "peft"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=list(METHODS), default="prompt_tuning", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="sentiment", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS)) + sorted(set(args.methods.split(",")) - set(METHODS))
    unknown += [s for s in args.shapes.split(",") if s != "sentiment" and text_shape(s) is None]
    known = {f"{side}-{dtype}" for side, dtype in TRAIN_CONFIGS}
    unknown += [c for c in args.configs.split(",") if c not in known]
    if unknown:
        ap.error(f"unknown section, method, shape or config {unknown[0]!r}")
    cuda = args.device.startswith("cuda")
    if args.gen_dtypes is None:
        args.gen_dtypes = "bfloat16,float32" if cuda else "float32,float32+packed+compiled,float16"
    if args.random_shape and not args.worker and ("sentiment" in args.shapes.split(",") and "train" in args.sections
                                                  or "accuracy" in args.sections):
        ap.error("--random-shape: the sentiment shape and the accuracy section need the real base and the "
                 "task's data (use the cls-BxT shape)")
    for entry in args.gen_dtypes.split(","):
        name, *modes = entry.split("+")
        if (name not in ("float32", "float16", "bfloat16") or not set(modes) <= {"packed", "compiled"}
                or ("packed" in modes and name != "float32")):
            ap.error(f"--gen-dtypes: {entry!r}: a dtype (float32, float16, bfloat16), optionally +compiled, "
                     "and float32 optionally +packed")
        if "packed" in modes and cuda:
            ap.error(f"--gen-dtypes: {entry!r}: the 4-bit products are CPU kernels")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here")
    return args


# --------------------------------------------------------------------------- the machine

def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import peft
    import transformers
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": DEVICE, "random_shape": RANDOM}
    if cuda():
        info["gpu"] = torch.cuda.get_device_name(DEVICE)
    return info


def cuda() -> bool:
    return DEVICE.startswith("cuda")


def matmul_peak(dtype, n=None, repeats=10) -> float:
    """FLOP/s of an n x n x n matmul in dtype on DEVICE: the fastest of `repeats` after three
    warm-ups. A peak is what the hardware can do; load on a shared machine only ever slows a
    repeat, so the best one (not the median, which came out below training's own rate) is the
    peak. n: 2048 on a CPU, 8192 on a GPU (a smaller one would time its launch)."""
    n = n or (8192 if cuda() else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        sync(DEVICE)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(DEVICE)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def peak_gpu_gb() -> "float | None":
    """torch.cuda.max_memory_allocated since the last reset_gpu_peak(), in GB; None on a CPU."""
    return torch.cuda.max_memory_allocated(DEVICE) / 1024 ** 3 if cuda() else None


def reset_gpu_peak():
    if cuda():
        sync(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)


# --------------------------------------------------------------------------- FLOPs

def train_flops(cfg, lengths, n_targets: int, method: str, P: int = N_VIRTUAL, r: int = LORA_R) -> int:
    """Useful FLOPs of one training step, counted from the model config; the same count is
    used for both sides (they get the same batch).

    lengths: real (non-pad) text tokens of each row; n_targets: positions with a loss.
    A matmul of (m x k) by (k x n) is 2mkn FLOPs. Per layer, at every position that must be
    computed (the real text tokens, no padding, plus the P virtual tokens of a soft prompt
    once per batch: they precede the text under causal attention, so every row shares them;
    peft runs them in every row, which counts as waste):

        linear = 2 (d*q + 2*d*kv + q*d + 3*d*ffn)      q = n_head*head_dim, kv = n_kv_head*head_dim
        lora   = 2 r (d + q) + 2 r (d + kv)             LoRA on q_proj and v_proj only

    Attention (scores Q K^T and the weighted sum A V), causal, per layer: 2 * 2 * q FLOPs per
    (query, key) pair it attends to; a row of m text tokens has m(m+1)/2 such pairs, plus
    m*P with P virtual tokens or a P-token prefix in front of its keys.
    LM head: 2 * d * vocab at the n_targets positions only (minipt's `loss_only`; peft computes
    it everywhere, which counts as waste).

    backward: a matmul gives the gradient of each operand that needs one, each costing the
    forward's FLOPs again. Frozen weights need only the input's gradient (1x forward); the
    trained LoRA A/B need both (2x); attention's two operands are both activations (2x). The
    gradient is taken to flow from the loss back through every layer (exact for the soft
    prompt; for prefix and LoRA it counts layer 0's q/k/v input gradients, which nothing
    needs, about 0.3 % of the step). Norms, softmax, activations and the optimizer: not counted.

        step = L * (2 * linear * positions + 3 * lora * positions + 3 * attention) + 2 * head
    """
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    q, kv, ffn = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    virtual = P if method == "prompt_tuning" else 0
    prefix = P if method in ("prompt_tuning", "p_tuning_v2") else 0
    positions = sum(lengths) + virtual
    pairs = virtual * (virtual + 1) // 2 + sum(m * (m + 1) // 2 + m * prefix for m in lengths)
    linear = 2 * (d * q + 2 * d * kv + q * d + 3 * d * ffn)
    lora = 2 * r * (d + q) + 2 * r * (d + kv) if method == "lora" else 0
    attention = 2 * 2 * q * pairs
    head = 2 * d * V * n_targets
    forward = L * (linear * positions + lora * positions + attention) + head
    backward = L * (linear * positions + 2 * lora * positions + 2 * attention) + head
    return forward + backward


# --------------------------------------------------------------------------- the two sides

def prompt_config(method: str) -> PromptConfig:
    if method == "prompt_tuning":
        return PromptConfig(num_virtual_tokens=N_VIRTUAL, init="text", init_text=INIT_TEXT)
    # the prefix table itself, no MLP (tests/test_prefix.py: peft's prefix_projection=False)
    if method == "p_tuning_v2":
        return PromptConfig(method="p_tuning_v2", num_virtual_tokens=N_VIRTUAL, prefix_projection=False,
                            init="random")
    return PromptConfig(method="lora", lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_targets=LORA_TARGETS)


def peft_config(method: str):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType
    if method == "prompt_tuning" and RANDOM:      # no transformers tokenizer to init from (timing only)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if method == "prompt_tuning":
        # peft's own text init, through the GGUF's tokenizer (same ids as minipt's)
        gguf = base_gguf(BASE)
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=INIT_TEXT,
                                  tokenizer_name_or_path=str(gguf.parent),
                                  tokenizer_kwargs={"gguf_file": gguf.name})
    if method == "p_tuning_v2":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL,
                                  prefix_projection=False)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=LORA_TARGETS)


def load_tokenizer_only():
    from minipt.tokenizer import load_tokenizer
    return load_tokenizer(sources(BASE, RANDOM)[0])


def load_hf(dtype):
    """The transformers model of the base's weights, on DEVICE."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(**sources(BASE, RANDOM)[1], dtype=dtype).to(DEVICE)


def build_minipt(method: str, dtype):
    """(PromptedModel in train mode, trainable params in fp32, tokenizer), as train.py builds them."""
    base, tok = load_base(sources(BASE, RANDOM)[0], dtype=dtype, device=DEVICE)
    model = attach(base, prompt_config(method), tok)
    params = model.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    return model.train(), params, tok


def build_peft(method: str, dtype):
    """(peft model in train mode, its trainable params as peft makes them)."""
    from peft import get_peft_model
    model = get_peft_model(load_hf(dtype), peft_config(method))
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def minipt_loss(model, batch):
    return model(batch["idx"], batch["targets"], attention_mask=batch["attention_mask"], loss_only=True)[1]


def peft_loss(model, batch, n_virtual: int):
    """peft gets minipt's idx and attention mask unchanged, and the labels with -100 outside
    the label token. transformers shifts `labels` by one inside the model (position t is
    scored against labels[t + 1]), which would need the label token as one more input column;
    `shift_labels`, already aligned with the logits, goes straight to the same loss function
    instead, so both sides read exactly the same tokens. peft prepends -100 for its virtual
    tokens to `labels` only, so they are prepended to `shift_labels` here (soft prompt)."""
    shifted = F.pad(batch["targets"], (n_virtual, 0), value=-100)
    return model(input_ids=batch["idx"], attention_mask=batch["attention_mask"], labels=batch["targets"],
                 shift_labels=shifted).loss


def build_side(side: str, method: str, dtype):
    """(loss_fn(batch), trainable params, base config, minipt tokenizer) for one configuration.
    Both sides batch the data with minipt's tokenizer, so both hold one: minipt its own."""
    cfg_dir = sources(BASE, RANDOM)[0]
    if side.startswith("minipt"):
        model, params, tok = build_minipt(method, dtype)
        if side == "minipt-compiled":
            model.base.compile_layers()       # train.py --compile=true
        return (lambda b: minipt_loss(model, b)), params, model.config, tok
    model, params = build_peft(method, dtype)
    from minipt.config import load_config
    n_virtual = N_VIRTUAL if method == "prompt_tuning" else 0
    return (lambda b: peft_loss(model, b, n_virtual)), params, load_config(cfg_dir), load_tokenizer_only()


def sentiment_batches(tok, n: int, cfg=DEFAULTS):
    """The first n training batches of train.py's default run, as minipt collates them."""
    task = load_task(cfg.data, seed=cfg.seed)
    rows = task.splits["train"]
    batches = Batches(len(rows), cfg.batch_size, cfg.seed, lengths=[len(r["input"]) for r in rows],
                      bucket_batches=cfg.bucket_batches)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return [collate([rows[i] for i in next(batches)], tok, task.template, cfg.max_len, False, pad)
            for _ in range(n)]


def text_shape(shape: str):
    """"text-8x128" -> (8, 128), and "cls-16x64" the same way; None if the name is not of that form."""
    m = re.fullmatch(r"(?:text|cls)-(\d+)x(\d+)", shape)
    return (int(m[1]), int(m[2])) if m and int(m[1]) > 0 and int(m[2]) > 1 else None


def classify_batches(n: int, B: int, T: int, vocab: int) -> list:
    """n batches of the classification shape without the task's data: B rows of random tokens,
    their lengths spread evenly from T/4 to T (a varied batch, 3/8 of it padding; the sentiment
    task's are a fifth or more), left padded, a loss on each row's last token only."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        lengths = torch.linspace(max(1, T // 4), T, B).round().long()[torch.randperm(B, generator=g)]
        mask = (torch.arange(T)[None] >= T - lengths[:, None]).long()              # (B, T), left padding
        idx = torch.randint(0, vocab, (B, T), generator=g) * mask
        targets = torch.full((B, T), -100)
        targets[:, -1] = torch.randint(0, vocab, (B,), generator=g)
        batches.append({"idx": idx, "targets": targets, "attention_mask": mask})
    return batches


def text_batches(tok, n: int, B: int, T: int):
    """n batches of B rows of T tokens: the xsum task's training rows, article then summary as
    its template writes them, cut to T tokens (shorter rows left-padded to the longest), loss on
    every token."""
    task = load_task("xsum")
    texts = (encode_text(tok, task.template.format(input=r["input"]) + r["target"])
             for r in task.splits["train"])
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    batches = []
    for _ in range(n):
        rows = [next(texts)[:T + 1] for _ in range(B)]
        idx, mask = pad_batch([r[:-1] for r in rows], pad)
        targets, _ = pad_batch([r[1:] for r in rows], -100)
        batches.append({"idx": idx, "targets": targets, "attention_mask": mask})
    return batches


def shape_batches(tok, shape: str, n: int, vocab: int):
    """n batches of the shape; random tokens for cls-BxT, and for text-BxT with --random-shape."""
    if shape == "sentiment":
        return sentiment_batches(tok, n)
    if shape.startswith("cls-"):
        return classify_batches(n, *text_shape(shape), vocab)
    if RANDOM:
        return [synthetic_batch(*text_shape(shape), vocab, seed=i) for i in range(n)]
    return text_batches(tok, n, *text_shape(shape))


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


# --------------------------------------------------------------------------- workers (one configuration each)

def train_worker(args) -> dict:
    """Warm-up steps, then timed steps: forward + backward + AdamW step + zero_grad."""
    torch.manual_seed(0)
    loss_fn, params, cfg, tok = build_side(args.side, args.method, getattr(torch, args.dtype))
    # loading alone (minipt reads fp32 and casts; transformers dequantizes)
    load_peak = peak_rss_gb()
    gpu_load_peak = peak_gpu_gb()
    reset_gpu_peak()                               # the steps' peak: weights + activations + optimizer state
    batches = [on_device(b) for b in shape_batches(tok, args.shape, args.warmup + args.steps, cfg.vocab_size)]
    optimizer = make_optimizer(DEFAULTS, params)   # AdamW, lr 3e-2, weight decay 0.01
    steps, initial_loss = [], None
    for i, batch in enumerate(batches):
        sync(DEVICE)
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(DEVICE)
        seconds = time.perf_counter() - t0
        if i == 0:
            initial_loss = loss.item()   # before any update: the same batch and prompt on both sides
            first_step_s = seconds       # includes torch.compile's compilation
        if i >= args.warmup:
            lengths = batch["attention_mask"].sum(1).tolist()
            n_targets = int((batch["targets"] != -100).sum())
            steps.append({"seconds": seconds, "tokens": sum(lengths), "loss": loss.item(),
                          "flops": train_flops(cfg, lengths, n_targets, args.method)})
    return {"side": args.side, "method": args.method, "dtype": args.dtype, "shape": args.shape,
            "initial_loss": initial_loss,
            "first_step_s": first_step_s, "steps": steps,
            "trainable": sum(p.numel() for p in params),
            "param_dtypes": sorted({str(p.dtype) for p in params}),
            "peak_rss_gb": peak_rss_gb(), "peak_rss_after_load_gb": load_peak,
            "peak_gpu_gb": peak_gpu_gb(), "peak_gpu_after_load_gb": gpu_load_peak}


def synthetic_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    """B rows of T random tokens, no padding, a loss on every position (the generation shape)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    return {"idx": idx, "targets": targets, "attention_mask": torch.ones(B, T, dtype=torch.long)}


def scaling_worker(args) -> dict:
    """Median soft-prompt step time at each (batch, length) point of both sweeps, and the peak
    RSS so far after each: the length sweep runs first, shortest first, so there it is the
    point's own peak."""
    torch.manual_seed(0)
    loss_fn, params, cfg, _ = build_side(args.side, "prompt_tuning", getattr(torch, args.dtype))
    optimizer = make_optimizer(DEFAULTS, params)
    points = [(args.scaling_batch, int(T)) for T in args.scaling_lengths.split(",")]
    points += [(int(B), args.scaling_len) for B in args.scaling_batches.split(",")]
    measured = {}
    for B, T in points:
        if (B, T) in measured:
            continue
        batch = on_device(synthetic_batch(B, T, cfg.vocab_size))
        times = []
        reset_gpu_peak()
        for i in range(1 + args.scaling_steps):
            sync(DEVICE)
            t0 = time.perf_counter()
            loss_fn(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(DEVICE)
            if i > 0:
                times.append(time.perf_counter() - t0)
        measured[(B, T)] = times, peak_rss_gb(), peak_gpu_gb()
        gpu = f", peak GPU {measured[(B, T)][2]:.2f} GB" if cuda() else ""
        print(f"  {args.side} {args.dtype}: batch {B} x {T} tokens: {statistics.median(times):.3f} s/step, "
              f"peak RSS {measured[(B, T)][1]:.2f} GB{gpu}", file=sys.stderr, flush=True)
    return {"side": args.side, "dtype": args.dtype,
            "points": [{"batch": B, "length": T, "seconds": statistics.median(ts), "all": ts,
                        "peak_rss_gb": rss, "peak_gpu_gb": gpu}
                       for (B, T), (ts, rss, gpu) in measured.items()]}


@torch.no_grad()
def peft_rank_accuracy(model, tok, rows, template, labels, n_virtual: int, batch_size: int = 32) -> float:
    """Rank classification as minipt's (every label one token, read at the prompt's last
    position); right padding, so peft's virtual tokens and the text keep their positions."""
    label_ids = [encode_text(tok, label) for label in labels]
    assert all(len(ids) == 1 for ids in label_ids), "every label must be one token"
    label_ids = [ids[0] for ids in label_ids]
    prompts = [encode_text(tok, template.format(input=r["input"])) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in chunk], tok.pad_id, left=False)
        logits = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits  # (B, n_virtual + T, V)
        last = n_virtual + mask.sum(1) - 1
        best = logits[torch.arange(len(chunk)), last.to(DEVICE)][:, label_ids].argmax(-1).tolist()
        correct += sum(labels[b] == rows[i]["target"] for b, i in zip(best, chunk))
    model.train(was_training)
    return correct / len(rows)


def recipe_steps(cfg, params, loss_fn, make_batch):
    """train.py's optimisation for a model that train.py cannot hold (peft's): the optimizer,
    learning-rate schedule and gradient clipping of `cfg`, one batch per step, no
    accumulation. Yields (step done, loss, seconds of forward + backward + update)."""
    optimizer = make_optimizer(cfg, params)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = on_device(make_batch())
        sync(DEVICE)
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        # train.py always measures the norm; it clips at grad_clip (inf: no clipping)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(DEVICE)
        yield step + 1, loss.item(), time.perf_counter() - t0


def accuracy_worker(args) -> dict:
    """train.py's default loop (minipt, bf16) or the same recipe with peft (fp32), test
    accuracy every --eval-every steps; the clock runs only while training."""
    cfg = dataclasses.replace(parse_train_config([]), steps=args.accuracy_steps)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.data, seed=cfg.seed)
    train_rows, test_rows = task.splits["train"], task.splits["test"][:args.test_rows]
    if args.side == "minipt":
        dtype = resolve_dtype(cfg.dtype)
        model, params, tok = build_minipt("prompt_tuning", getattr(torch, dtype))
        loss_fn = lambda b: minipt_loss(model, b)
        evaluate = lambda: rank_classify(model, tok, test_rows, task.template, task.labels)[0]
    else:
        model, params = build_peft("prompt_tuning", torch.float32)
        tok = load_tokenizer_only()
        loss_fn = lambda b: peft_loss(model, b, N_VIRTUAL)
        evaluate = lambda: peft_rank_accuracy(model, tok, test_rows, task.template, task.labels, N_VIRTUAL)
        dtype = "float32"
    batches = Batches(len(train_rows), cfg.batch_size, cfg.seed,
                      lengths=[len(r["input"]) for r in train_rows], bucket_batches=cfg.bucket_batches)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    make_batch = lambda: collate([train_rows[i] for i in next(batches)], tok, task.template, cfg.max_len,
                                 False, pad)
    clock, curve = 0.0, []
    for done, loss, seconds in recipe_steps(cfg, params, loss_fn, make_batch):
        clock += seconds
        if done % args.eval_every == 0 or done == cfg.steps:
            accuracy = evaluate()
            curve.append({"step": done, "train_seconds": clock, "accuracy": accuracy, "loss": loss})
            print(f"  {args.side}: step {done}/{cfg.steps}, {clock:.0f} s training, "
                  f"test accuracy {accuracy:.4f}",
                  file=sys.stderr, flush=True)
    return {"side": args.side, "dtype": dtype, "steps": cfg.steps, "test_rows": len(test_rows),
            "curve": curve, "peak_rss_gb": peak_rss_gb()}


def run_worker(args, kind: str, side: str, method: str = "prompt_tuning", dtype: str = "bfloat16",
               shape: str = "sentiment") -> dict:
    """One configuration in a fresh Python process; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--side", side,
           "--base", args.base, "--method", method, "--dtype", dtype, "--shape", shape,
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--scaling-lengths", args.scaling_lengths, "--scaling-batches", args.scaling_batches,
           "--scaling-batch", str(args.scaling_batch), "--scaling-len", str(args.scaling_len),
           "--scaling-steps", str(args.scaling_steps), "--accuracy-steps", str(args.accuracy_steps),
           "--eval-every", str(args.eval_every), "--device", args.device]
    if args.random_shape:
        cmd += ["--random-shape", args.random_shape]
    if args.test_rows is not None:
        cmd += ["--test-rows", str(args.test_rows)]
    env = {**os.environ, "MINIPT_PLAIN": "1"} if side == "minipt-plain" else None
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"worker {kind} {side} {method} {dtype} failed (exit {done.returncode})")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- sections

def train_section(args, info) -> dict:
    """{shape: the shape's table} for every shape of --shapes."""
    return {shape: train_shape(args, info, shape) for shape in args.shapes.split(",")}


def train_shape(args, info, shape: str) -> dict:
    methods = args.methods.split(",")
    chosen = args.configs.split(",")
    configs = [(m, side, dtype) for m in methods for side, dtype in TRAIN_CONFIGS if f"{side}-{dtype}" in chosen]
    runs = {c: [] for c in configs}
    for r in range(args.rounds):
        for m, side, dtype in configs if r % 2 == 0 else configs[::-1]:
            print(f"train {shape}: {METHODS[m]}, {side} {dtype} (round {r + 1}/{args.rounds})",
                  file=sys.stderr, flush=True)
            runs[(m, side, dtype)].append(run_worker(args, "train", side, m, dtype, shape))
    rows = []
    for (m, side, dtype), results in runs.items():
        steps = [s for res in results for s in res["steps"]]
        rows.append({"method": m, "side": side, "dtype": dtype,
                     "step_s": statistics.median(s["seconds"] for s in steps),
                     "first_step_s": statistics.median(res["first_step_s"] for res in results),
                     "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in steps),
                     "flops_per_s": statistics.median(s["flops"] / s["seconds"] for s in steps),
                     "peak_rss_gb": max(res["peak_rss_gb"] for res in results),
                     "peak_gpu_gb": max((res["peak_gpu_gb"] or 0) for res in results) if cuda() else None,
                     "initial_loss": results[0]["initial_loss"], "trainable": results[0]["trainable"],
                     "param_dtypes": results[0]["param_dtypes"], "runs": results})
    for row in rows:
        row["mfu"] = row["flops_per_s"] / info["bf16_peak_flops"]
        row["mfu_own_dtype"] = row["flops_per_s"] / info[
            f"{'bf16' if row['dtype'] == 'bfloat16' else 'fp32'}_peak_flops"]
    ratios = {}
    for m in methods:
        ours = max((r for r in rows if r["method"] == m and r["side"].startswith("minipt")),
                   key=lambda r: r["tokens_per_s"])
        peft_rows = [r for r in rows if r["method"] == m and r["side"] == "peft"]
        ratios[m] = {"minipt_best": ours["side"]}
        if peft_rows:
            best = max(peft_rows, key=lambda r: r["tokens_per_s"])
            ratios[m].update({"peft_best_dtype": best["dtype"], "speed": ours["tokens_per_s"] / best["tokens_per_s"],
                              "rss_vs_best": ours["peak_rss_gb"] / best["peak_rss_gb"],
                              **{f"rss_vs_{r['dtype']}": ours["peak_rss_gb"] / r["peak_rss_gb"] for r in peft_rows}})
        plain = [r for r in rows if r["method"] == m and r["side"] == "minipt-plain"]
        fast_rows = [r for r in rows if r["method"] == m and r["side"] == "minipt"]
        if plain and fast_rows:
            ratios[m]["fast_vs_plain"] = fast_rows[0]["tokens_per_s"] / plain[0]["tokens_per_s"]
        if cuda():
            ratios[m].update({f"speed_vs_{r['dtype']}": ours["tokens_per_s"] / r["tokens_per_s"] for r in peft_rows})
            ratios[m].update({f"gpu_vs_{r['dtype']}": ours["peak_gpu_gb"] / r["peak_gpu_gb"] for r in peft_rows})

    if shape == "sentiment":
        what = f"sentiment batches of {DEFAULTS.batch_size}, loss on the label token"
    elif shape.startswith("cls-"):
        what = "batches of {} random rows of {}/4 to {} tokens, left padded, loss on the last one".format(
            *text_shape(shape), text_shape(shape)[1])
    else:
        what = "batches of {} x {} tokens of {}, loss on every token".format(
            *text_shape(shape), "random tokens" if RANDOM else "xsum text")
    print(f"\ntraining step, {what}, "
          f"median of {args.steps} steps x {args.rounds} round(s) after {args.warmup} warm-up")
    gpu = cuda()
    print(f"{'method':<13}{'config':<25}{'step 1 s':>9}{'step s':>8}{'tok/s':>9}{'RSS GB':>8}"
          + (f"{'GPU GB':>8}" if gpu else "") + f"{'MFU':>7}"
          f"{'MFU own':>9}{'loss 0':>10}{'trainable':>11}")
    for r in rows:
        print(f"{METHODS[r['method']]:<13}{r['side'] + ' ' + r['dtype']:<25}"
              f"{r['first_step_s']:>9.1f}{r['step_s']:>8.3f}"
              f"{r['tokens_per_s']:>9.0f}{r['peak_rss_gb']:>8.2f}"
              + (f"{r['peak_gpu_gb']:>8.2f}" if gpu else "") + f"{100 * r['mfu']:>6.1f}%"
              f"{100 * r['mfu_own_dtype']:>8.1f}%"
              f"{r['initial_loss']:>10.4f}{r['trainable']:>11,}")
    print("MFU: useful FLOPs (bench.train_flops) / step time / bf16 matmul peak; "
          "'own': of the config's dtype peak; "
          "step 1: the first step alone (compilation included)"
          + ("; GPU GB: torch.cuda.max_memory_allocated over the steps" if gpu else ""))
    for m, q in ratios.items():
        line = f"{METHODS[m]:<13}{q['minipt_best']} tok/s"
        if "speed" in q:
            rss = ", ".join(f"{q[k]:.2f}x vs peft {k[7:]}" for k in q if k.startswith("rss_vs_") and k != "rss_vs_best")
            line += f" / peft {q['peft_best_dtype']} (its faster dtype): {q['speed']:.2f}x; RSS {rss}"
        if gpu and "speed" in q:
            line += "; tok/s " + ", ".join(f"{q[k]:.2f}x vs peft {k[9:]}" for k in q if k.startswith("speed_vs_"))
            line += "; GPU memory " + ", ".join(f"{q[k]:.2f}x vs peft {k[7:]}" for k in q if k.startswith("gpu_vs_"))
        if "fast_vs_plain" in q:
            line += f"; speed layer on / off (MINIPT_PLAIN=1): {q['fast_vs_plain']:.2f}x tok/s"
        print(line)
    return {"rows": rows, "ratios": ratios}


class SoftPromptGenerate:
    """transformers' `generate` on the peft model's base with peft's soft prompt (`get_prompt`)
    in front of every row as input embeddings: what peft's own `generate` does at prefill.

    peft 0.21's `generate` cannot be timed as it is with transformers 5.x: its
    `prepare_inputs_for_generation` looks for the KV cache under `past_key_values`, which
    transformers now passes as `cache`, so it inserts the 20 virtual tokens again at every
    decoding step (21 positions a step, different tokens). `--peft-generate peft` times it
    anyway; the section always reports whether its tokens match."""

    def __init__(self, peft_model):
        self.peft_model, self.hf = peft_model, peft_model.get_base_model()

    def generate(self, ids, attention_mask, generation_config):
        B = ids.size(0)
        embed = self.hf.get_input_embeddings()
        prompt = self.peft_model.get_prompt(batch_size=B).to(embed.weight.dtype)   # (B, P, C)
        # peft's layout: prompt first
        embeds = torch.cat([prompt, embed(ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(B, prompt.size(1)), attention_mask], dim=1)
        new = self.hf.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=generation_config)
        # what bench_generate.runners slices: the prompt ids, then the new ones
        return torch.cat([ids, new], dim=1)


def generate_section(args, dtype_name: str) -> dict:
    """bench_generate's cases with the same 20-token soft prompt on both sides, both in one dtype."""
    from peft import get_peft_model
    name, *modes = dtype_name.split("+")
    dtype = getattr(torch, name)
    base, tok = load_base(sources(BASE, RANDOM)[0], dtype=dtype, device=DEVICE)
    if "packed" in modes:
        pack_for_decoding(base)
    ours = attach(base, prompt_config("prompt_tuning"), tok).eval()
    if "compiled" in modes:
        compile_decoding(ours)
    theirs = get_peft_model(load_hf(dtype), peft_config("prompt_tuning")).eval()
    table = theirs.prompt_encoder["default"].embedding.weight
    init_diff = (table - ours.method.prompt).abs().max().item()   # both text-initialised: ~0
    with torch.no_grad():
        table.copy_(ours.method.prompt)                                # exactly the same prompt

    # does peft's own generate give minipt's tokens? (batch 1, 8 tokens)
    probe_minipt, probe_peft = runners(ours, theirs, [tok.encode(PROMPT)], 8, tok.pad_id, device=DEVICE)
    ours_probe, peft_probe = probe_minipt(), probe_peft()
    peft_native_ok = ours_probe == peft_probe

    peft_side = theirs if args.peft_generate == "peft" else SoftPromptGenerate(theirs)
    cases = []
    for b in (int(s) for s in args.gen_batch_sizes.split(",")):
        prompts = [tok.encode(PROMPT)] if b == 1 else [tok.encode(t) for t in BATCH_PROMPTS[:b]]
        if len(prompts) != b:
            raise SystemExit(f"generate: batch size {b}: only 1 and up to {len(BATCH_PROMPTS)} are set up")
        print(f"generate: batch {b}", file=sys.stderr, flush=True)
        run_minipt, run_peft = runners(ours, peft_side, prompts, args.new_tokens, tok.pad_id, device=DEVICE)
        name = f"batch {b}" + (" (left padded)" if b > 1 else "")
        cases.append(bench_case(name, run_minipt, run_peft, b * args.new_tokens, args.gen_repeats,
                                device=DEVICE))
    if args.gen_lookup:
        print(f"generate: batch 1, prompt lookup {args.gen_lookup}", file=sys.stderr, flush=True)
        run_minipt, run_peft = runners(ours, peft_side, [tok.encode(PROMPT)], args.new_tokens, tok.pad_id,
                                       lookup=args.gen_lookup, device=DEVICE)
        cases.append(bench_case(f"batch 1, lookup {args.gen_lookup}", run_minipt, run_peft, args.new_tokens,
                                args.gen_repeats, device=DEVICE))
    how = ("peft's generate" if args.peft_generate == "peft"
           else "transformers generate + peft's prompt as embeddings")
    print(f"\ngreedy generation with a {N_VIRTUAL}-token soft prompt, {args.new_tokens} new tokens per row, "
          f"{dtype_name}, median of {args.gen_repeats}; peft side: {how}")
    print_cases(cases, "peft")
    print(f"text init: max difference between the two prompts before copying {init_diff:.1e}; "
          f"peft's own generate gives minipt's tokens (batch 1, 8 tokens): {peft_native_ok}")
    return {"dtype": dtype_name, "new_tokens": args.new_tokens, "repeats": args.gen_repeats,
            "peft_side": how, "prompt_init_max_diff": init_diff,
            "peft_native_generate_identical": peft_native_ok,
            "peft_native_probe": {"minipt": ours_probe, "peft": peft_probe}, "cases": cases}


def scaling_section(args, peft_dtype: str) -> dict:
    print(f"scaling: minipt bfloat16, then peft {peft_dtype}", file=sys.stderr, flush=True)
    sides = {"minipt": run_worker(args, "scaling", "minipt", dtype="bfloat16"),
             "peft": run_worker(args, "scaling", "peft", dtype=peft_dtype)}
    sweeps = {"length": [(args.scaling_batch, int(T)) for T in args.scaling_lengths.split(",")],
              "batch": [(int(B), args.scaling_len) for B in args.scaling_batches.split(",")]}
    points = {side: {(p["batch"], p["length"]): p for p in res["points"]} for side, res in sides.items()}
    out = {"peft_dtype": peft_dtype, "sides": sides, "sweeps": {}}
    print(f"\nsoft-prompt training step, synthetic batches, loss on every token, median of "
          f"{args.scaling_steps}; minipt bf16 vs peft {peft_dtype}; time ratio = peft / minipt, "
          f"RSS ratio = minipt / peft (peak RSS: the length sweep only)")
    for name, sweep in sweeps.items():
        fixed = f"batch {args.scaling_batch}" if name == "length" else f"length {args.scaling_len}"
        print(f"{name + ' (' + fixed + ')':<22}{'minipt s':>10}{'peft s':>10}{'ratio':>8}"
              + (f"{'minipt GB':>11}{'peft GB':>9}{'ratio':>7}" if name == "length" else ""))
        table = []
        for B, T in sweep:
            ours, theirs = points["minipt"][(B, T)], points["peft"][(B, T)]
            row = {"batch": B, "length": T, "minipt_s": ours["seconds"], "peft_s": theirs["seconds"],
                   "speedup": theirs["seconds"] / ours["seconds"],
                   "minipt_rss_gb": ours["peak_rss_gb"], "peft_rss_gb": theirs["peak_rss_gb"],
                   "minipt_gpu_gb": ours.get("peak_gpu_gb"), "peft_gpu_gb": theirs.get("peak_gpu_gb")}
            table.append(row)
            line = (f"{(T if name == 'length' else B):<22}{row['minipt_s']:>10.3f}{row['peft_s']:>10.3f}"
                    f"{row['speedup']:>7.2f}x")
            if name == "length":
                line += (f"{row['minipt_rss_gb']:>11.2f}{row['peft_rss_gb']:>9.2f}"
                         f"{row['minipt_rss_gb'] / row['peft_rss_gb']:>6.2f}x")
            if cuda():
                line += (f"   GPU GB {row['minipt_gpu_gb']:.2f} vs {row['peft_gpu_gb']:.2f}: "
                         f"{row['minipt_gpu_gb'] / row['peft_gpu_gb']:.2f}x")
            print(line)
        out["sweeps"][name] = table
    out["plot"] = str(args.plot) if plot_scaling(out, args, peft_dtype) else None
    print(f"plot: {out['plot'] or 'none (matplotlib is not installed)'}")
    return out


def plot_scaling(result, args, peft_dtype) -> bool:
    """Step time against length and batch, and peak RSS against length: log-log, both sides."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("length", "s", "step time (s)"), ("length", "rss_gb", "peak RSS (GB)"),
              ("batch", "s", "step time (s)")]
    for ax, (name, what, ylabel) in zip(axes, panels):
        table = result["sweeps"][name]
        x = [row[name] for row in table]
        ax.plot(x, [row[f"minipt_{what}"] for row in table], marker="o", label="minipt bf16")
        ax.plot(x, [row[f"peft_{what}"] for row in table], marker="s", label=f"peft {peft_dtype}")
        fixed = f"batch {args.scaling_batch}" if name == "length" else f"length {args.scaling_len}"
        ax.set(xscale="log", yscale="log", xlabel="sequence length" if name == "length" else "batch size",
               ylabel=ylabel, title=f"soft prompt training step, {fixed}")
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ys = [row[f"{side}_{what}"] for row in table for side in ("minipt", "peft")]
        minor = "23456789" if max(ys) < 10 * min(ys) else "235"          # which minor ticks get a label
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))                       # 0.1, 1, 10
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _, m=minor: f"{v:g}" if f"{v:.0e}"[0] in m else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("loss on every token; " + cpu_name(), fontsize=9)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)
    return True


def accuracy_section(args) -> dict:
    print("accuracy: minipt (train.py defaults, bf16), then peft (fp32)", file=sys.stderr, flush=True)
    runs = {side: run_worker(args, "accuracy", side) for side in ("minipt", "peft")}
    target = runs["peft"]["curve"][-1]["accuracy"]
    peft_time = runs["peft"]["curve"][-1]["train_seconds"]
    reached = next((p for p in runs["minipt"]["curve"] if p["accuracy"] >= target), None)
    result = {"peft_final_accuracy": target, "peft_seconds": peft_time,
              "minipt_final_accuracy": runs["minipt"]["curve"][-1]["accuracy"],
              "minipt_seconds_to_peft_accuracy": reached and reached["train_seconds"],
              "minipt_step_to_peft_accuracy": reached and reached["step"],
              "speedup": reached and peft_time / reached["train_seconds"], "runs": runs}
    print(f"\ntime to accuracy, {runs['peft']['steps']} steps of {DEFAULTS.batch_size}, test accuracy on "
          f"{runs['peft']['test_rows']} rows every {args.eval_every} steps (evaluation off the clock)")
    print(f"{'step':>6}{'minipt acc':>12}{'minipt s':>10}{'peft acc':>10}{'peft s':>9}")
    for a, b in zip(runs["minipt"]["curve"], runs["peft"]["curve"]):
        print(f"{a['step']:>6}{a['accuracy']:>12.4f}{a['train_seconds']:>10.1f}"
              f"{b['accuracy']:>10.4f}{b['train_seconds']:>9.1f}")
    if reached:
        print(f"peft's final accuracy {target:.4f} after {peft_time:.1f} s; minipt first reached it at step "
              f"{reached['step']} after {reached['train_seconds']:.1f} s: {result['speedup']:.2f}x less time")
    else:
        print(f"peft's final accuracy {target:.4f} after {peft_time:.1f} s; minipt did not reach it "
              f"(final {result['minipt_final_accuracy']:.4f})")
    return result


def main(argv=None):
    global BASE, RANDOM, DEVICE
    args = parse_args(argv)
    BASE, RANDOM, DEVICE = args.base, args.random_shape, args.device
    if args.worker:
        work = {"train": train_worker, "scaling": scaling_worker, "accuracy": accuracy_worker}[args.worker]
        print(json.dumps(work(args)), flush=True)
        return
    if RANDOM:
        sources(BASE, RANDOM)     # built once here, before the workers read it
    info = machine_info()
    print(f"{info['cpu']}, {info['threads']} torch threads; torch {info['torch']}, transformers "
          f"{info['transformers']}, peft {info['peft']}", flush=True)
    if cuda() or RANDOM:
        print(f"device {DEVICE}" + (f" ({info['gpu']})" if cuda() else "")
              + (f"; random weights in {RANDOM}'s shape" if RANDOM else ""), flush=True)
    results = {"info": info, "args": {k: str(v) for k, v in vars(args).items()}}
    if "train" in args.sections:
        info["bf16_peak_flops"] = matmul_peak(torch.bfloat16)
        info["fp32_peak_flops"] = matmul_peak(torch.float32)
        n = 8192 if cuda() else 2048
        print(f"matmul peak ({n}^3, best of 10): bf16 {info['bf16_peak_flops'] / 1e9:.0f} GFLOP/s, "
              f"fp32 {info['fp32_peak_flops'] / 1e9:.0f} GFLOP/s", flush=True)
        results["train"] = train_section(args, info)
    if "generate" in args.sections:
        results["generate"] = [generate_section(args, d) for d in args.gen_dtypes.split(",")]
    if "scaling" in args.sections:
        peft_dtype = args.peft_dtype or "float32"
        first = next(iter(results["train"].values()), {}) if "train" in results else {}
        if args.peft_dtype is None and "prompt_tuning" in first.get("ratios", {}):
            peft_dtype = first["ratios"]["prompt_tuning"]["peft_best_dtype"]
        results["scaling"] = scaling_section(args, peft_dtype)
    if "accuracy" in args.sections:
        results["accuracy"] = accuracy_section(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
