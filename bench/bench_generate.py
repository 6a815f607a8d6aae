"""Greedy decoding speed: minipt `generate` against transformers `model.generate`, and at
batch 1 against llama.cpp (llama-cpp-python, built by `make bench-deps`), the engine people
use for 4-bit decoding on a CPU, reading the GGUF itself.

Both sides load the same GGUF (SmolLM2-135M-Instruct unless `--base` names another of
weights.BASES; minipt through its converted checkpoint in `weights/`) and produce exactly
`--new-tokens` tokens per row, with EOS switched off on both, so they do the same work. Measured cases:

- batch 1, one prompt;
- batch 8, prompts of different lengths, left padded.

After a warm-up call per side and case, `--repeats` timed calls alternate which side goes
first, so the noise of a shared machine falls on both. The table gives the median tokens/s
(new tokens of all rows / wall time, prefill included), the ratio of the medians, the
median of the per-repeat ratios (each pair ran back to back, so it shrugs off a burst of
load better), and how many rows of greedy tokens the two sides share exactly.

    python bench/bench_generate.py                       # fp32, 5 repeats
    python bench/bench_generate.py --dtype bfloat16 --repeats 9 --json bench.json
    python bench/bench_generate.py --packed      # minipt decodes from the GGUF's 4-bit codes
    python bench/bench_generate.py --packed --compile    # ... with its one-token step compiled
    python bench/bench_generate.py --device cuda --dtype bfloat16 --random-shape qwen2.5-0.5b

On CUDA (`--device cuda`) every timer is read after torch.cuda.synchronize(), and the table
adds each side's peak GPU memory above the weights both hold (torch.cuda.max_memory_allocated,
reset before the side's first call of the case); llama.cpp, a CPU engine here, sits out.
`--random-shape` decodes with random weights in a real model's shape (bench/random_bases.py),
on both sides, for a machine where the real ones cannot be fetched.

With --packed, the packed model's fidelity is measured first: its next-token distributions
along fp32 greedy continuations of the batch prompts, one token a forward through the KV
cache (what decoding computes), against the fp32 model's, next to the bf16 model's (and,
with --compile, the compiled packed step's). Compiling happens in the warm-up calls, off
the clock; the table gives each case's minipt warm-up time.

Threads are torch's defaults; llama.cpp gets as many; the count is printed with the results.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from minipt.checkpoint import load_base  # noqa: E402
from minipt.generation import compile_decoding, generate, pad_batch, stepwise_logits  # noqa: E402
from minipt.packed import pack_for_decoding  # noqa: E402
from weights import BASES, base_checkpoint, base_gguf  # noqa: E402
import random_bases  # noqa: E402

BASE = "smollm2"          # --base: which of weights.BASES both sides load
RANDOM = None             # --random-shape: random weights of that shape instead (random_bases.SHAPES)
PROMPT = "Once upon a time, in a small village by the sea, there lived"
BATCH_PROMPTS = [  # lengths 2 to ~30 tokens, so left padding really happens
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    PROMPT,
    "1, 2, 3, 5, 8, 13,",
    "Write a short poem about the sea, the wind and a lighthouse keeper who never sleeps.",
    "Q: What is the boiling point of water at sea level?\nA:",
    "In 1969,",
]


def _version(package):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per side and case")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, from 1 and 8")
    ap.add_argument("--packed", action="store_true",
                    help="minipt decodes with the checkpoint's 4-bit codes (minipt.packed; fp32 activations)")
    ap.add_argument("--compile", action="store_true",
                    help="minipt's one-token step is torch.compile'd (minipt.generation.compile_decoding)")
    ap.add_argument("--base", choices=list(BASES), default=BASE, help="the base both sides load")
    ap.add_argument("--random-shape", choices=list(random_bases.SHAPES), default=None,
                    help="random weights in this real model's shape on both sides, instead of --base")
    ap.add_argument("--device", default="cpu", help="where both sides decode: cpu, cuda, cuda:1, ...")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                    help="leave out llama.cpp (by default it decodes batch 1 beside transformers)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def sources(base, random=None):
    """(minipt checkpoint dir, transformers' from_pretrained arguments) for the same weights on
    both sides: a real base's converted checkpoint and its GGUF, or a random base's two
    directories (random_bases.build)."""
    if random:
        ours, hf = random_bases.build(random)
        return ours, {"pretrained_model_name_or_path": hf}
    gguf = base_gguf(base)
    return base_checkpoint(base), {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}


def load_models(dtype, device="cpu"):
    from transformers import AutoModelForCausalLM
    ours_dir, hf_source = sources(BASE, RANDOM)
    ours, tok = load_base(ours_dir, dtype=dtype, device=device)
    hf = AutoModelForCausalLM.from_pretrained(**hf_source, dtype=dtype).to(device).eval()
    return ours, hf, tok


def sync(device):
    """Wait for the work queued on the device: CUDA runs kernels asynchronously, so a timer read
    without waiting would measure their launches."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def gpu_peak(fn, device):
    """(fn(), the peak GPU memory in GB that fn allocated above what was allocated before it)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 1024 ** 3


def runners(ours, hf, prompts, new_tokens, pad_id, lookup=0, device="cpu"):
    """Two zero-argument callables returning the new tokens of every row as lists.
    lookup: prompt-lookup drafts of up to this many tokens on both sides (minipt's `lookup`,
    transformers' `prompt_lookup_num_tokens`). device: where transformers' inputs go (minipt's
    generate takes its model's)."""
    from transformers import GenerationConfig
    ids, mask = pad_batch(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # eos_token_id=None: transformers must not stop early nor mask EOS (min_new_tokens would
    # change the logits), so both sides run the same argmax for the same number of steps.
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                           pad_token_id=pad_id, bos_token_id=None, prompt_lookup_num_tokens=lookup or None)

    def run_minipt():
        return generate(ours, prompts, new_tokens, eos_id=None, pad_id=pad_id, lookup=lookup)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, generation_config=cfg)
        return out[:, ids.size(1):].tolist()

    return run_minipt, run_hf


def timed(fn, device="cpu"):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def llama_cpp_runner(prompt, new_tokens, threads):
    """A zero-argument callable decoding `prompt` (token ids) greedily for exactly new_tokens
    tokens with llama.cpp (llama-cpp-python) on the base's own GGUF, as its one row; None
    when llama-cpp-python is not installed (`make bench-deps` builds it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp column skipped: llama-cpp-python is not installed (make bench-deps)", flush=True)
        return None
    llm = Llama(model_path=str(base_gguf(BASE)), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)

    def run_llama_cpp():
        out = []
        # generate() never stops by itself (EOS included): the loop takes exactly new_tokens
        for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == new_tokens:
                break
        return [out]

    return run_llama_cpp


def bench_case(name, run_minipt, run_hf, n_tokens, repeats, run_llama_cpp=None, device="cpu"):
    """Median tokens/s of each side over `repeats` timed calls in rotating order, after one
    warm-up call each; llama.cpp is the optional third side. On CUDA the warm-up calls also
    give each side's peak GPU memory above what was allocated before (both sides' weights)."""
    sides = [("minipt", run_minipt), ("transformers", run_hf)]
    if run_llama_cpp is not None:
        sides.append(("llama.cpp", run_llama_cpp))
    cuda = str(device).startswith("cuda")
    gpu = {}
    if cuda:
        warmup_s, (ours_out, gpu["minipt"]) = timed(lambda: gpu_peak(run_minipt, device), device)
        outputs = {"minipt": ours_out}
        for side, fn in sides[1:]:
            outputs[side], gpu[side] = gpu_peak(fn, device)
    else:
        warmup_s, ours_out = timed(run_minipt)     # warm-up (compiling, if any); also the outputs we compare
        outputs = {"minipt": ours_out, **{side: fn() for side, fn in sides[1:]}}
    for rows in outputs.values():
        assert all(len(r) == len(rows[0]) for r in rows), "a side stopped early"
    hf_out = outputs["transformers"]
    times = {side: [] for side, _ in sides}
    for i in range(repeats):
        for side, fn in sides[i % len(sides):] + sides[:i % len(sides)]:
            times[side].append(timed(fn, device)[0])
    tps = {side: [n_tokens / t for t in ts] for side, ts in times.items()}
    med = {side: statistics.median(v) for side, v in tps.items()}
    peer = {}
    if run_llama_cpp is not None:
        peer = {"llama_cpp_tok_s": med["llama.cpp"], "llama_cpp_ratio": med["minipt"] / med["llama.cpp"],
                "llama_cpp_paired_ratio": statistics.median(
                    a / b for a, b in zip(tps["minipt"], tps["llama.cpp"])),
                "llama_cpp_identical": ours_out == outputs["llama.cpp"],
                "llama_cpp_tok_s_all": tps["llama.cpp"]}
    if cuda:
        peer.update({"minipt_gpu_extra_gb": gpu["minipt"], "transformers_gpu_extra_gb": gpu["transformers"]})
    return {**peer,
        "case": name,
        "new_tokens_total": n_tokens,
        "minipt_tok_s": med["minipt"],
        "transformers_tok_s": med["transformers"],
        "ratio": med["minipt"] / med["transformers"],
        "paired_ratio": statistics.median(a / b for a, b in zip(tps["minipt"], tps["transformers"])),
        "identical": ours_out == hf_out,
        "identical_rows": sum(a == b for a, b in zip(ours_out, hf_out)),
        "rows": len(ours_out),
        "minipt_warmup_s": warmup_s,
        "minipt_tok_s_all": tps["minipt"],
        "transformers_tok_s_all": tps["transformers"],
    }


def print_cases(cases, peer: str) -> None:
    """The table of bench_case results: tokens/s of both sides, ratios, identical rows."""
    head = f"{peer} tok/s"
    llama = any("llama_cpp_tok_s" in c for c in cases)
    gpu = all("minipt_gpu_extra_gb" in c for c in cases)
    print(f"{'case':<24}{'minipt tok/s':>14}{head:>{len(head) + 2}}{'ratio':>8}{'paired':>8}{'identical':>11}"
          + (f"{'llama.cpp tok/s':>17}{'ratio':>8}{'paired':>8}{'identical':>11}" if llama else "")
          + f"{'minipt warm-up':>16}" + (f"{'GPU GB+ minipt':>16}{peer[:6] + ' GB+':>12}" if gpu else ""))
    for c in cases:
        same = f"{c['identical_rows']}/{c['rows']} rows" if c["rows"] > 1 else str(c["identical"])
        line = (f"{c['case']:<24}{c['minipt_tok_s']:>14.1f}{c['transformers_tok_s']:>{len(head) + 2}.1f}"
                f"{c['ratio']:>7.2f}x{c['paired_ratio']:>7.2f}x{same:>11}")
        if "llama_cpp_tok_s" in c:
            line += (f"{c['llama_cpp_tok_s']:>17.1f}{c['llama_cpp_ratio']:>7.2f}x{c['llama_cpp_paired_ratio']:>7.2f}x"
                     f"{str(c['llama_cpp_identical']):>11}")
        elif llama:
            line += " " * 44
        line += f"{c['minipt_warmup_s']:>15.1f}s"
        if gpu:
            line += f"{c['minipt_gpu_extra_gb']:>16.3f}{c['transformers_gpu_extra_gb']:>12.3f}"
        print(line)
    if gpu:
        print("GPU GB+: peak GPU memory above the loaded weights (torch.cuda.max_memory_allocated), "
              "the side's first call of the case")


def next_token_logprobs(model, seqs):
    return torch.cat([stepwise_logits(model, seq) for seq in seqs]).log_softmax(-1)


def pack_and_measure_fidelity(model, tok, new_tokens=96, compile=False):
    """Mean KL from fp32 and top-1 agreement with fp32, for the bf16 model and for `model`
    (fp32) once packed, and with compile, once its one-token step is compiled too: packs (and
    compiles) `model` after measuring it as it was."""
    prompts = [tok.encode(t) for t in BATCH_PROMPTS]
    seqs = [p + out for p, out in
            zip(prompts, generate(model, prompts, new_tokens, eos_id=None, pad_id=tok.pad_id))]
    fp32 = next_token_logprobs(model, seqs)
    bf16 = next_token_logprobs(load_base(sources(BASE, RANDOM)[0], dtype=torch.bfloat16)[0], seqs)
    n_packed = pack_for_decoding(model)
    measured = {"bf16": bf16, "packed": next_token_logprobs(model, seqs)}
    if compile:
        compile_decoding(model)
        t0 = time.perf_counter()
        measured["packed, compiled"] = next_token_logprobs(model, seqs)
        print(f"compiled the one-token step ({time.perf_counter() - t0:.0f} s with the fidelity check)",
              flush=True)
    result = {"positions": fp32.size(0), "linear_layers_packed": n_packed}
    for name, logp in measured.items():
        kl = torch.nn.functional.kl_div(logp, fp32, log_target=True, reduction="batchmean").item()
        result[name] = {"mean_kl": kl,
                        "top1_agreement": (logp.argmax(-1) == fp32.argmax(-1)).float().mean().item()}
    print(f"fidelity to fp32 over {result['positions']} positions ({n_packed} layers packed): "
          + "; ".join(f"{name} mean KL {result[name]['mean_kl']:.1e}, "
                      f"top-1 {100 * result[name]['top1_agreement']:.1f} %"
                      for name in measured), flush=True)
    return result


def main(argv=None):
    global BASE, RANDOM
    args = parse_args(argv)
    BASE, RANDOM = args.base, args.random_shape
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    if args.packed and args.dtype != "float32":
        raise SystemExit("--packed: decoding from 4-bit codes keeps the model in float32; drop --dtype")
    if args.packed and cuda:
        raise SystemExit("--packed: the 4-bit products are CPU kernels; drop --device")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    ours, hf, tok = load_models(dtype, args.device)
    fidelity = pack_and_measure_fidelity(ours, tok, compile=args.compile) if args.packed else None
    if args.compile and not args.packed:
        compile_decoding(ours)
    cases = []
    for b in (int(s) for s in args.batch_sizes.split(",")):
        prompts = [tok.encode(PROMPT)] if b == 1 else [tok.encode(t) for t in BATCH_PROMPTS[:b]]
        if len(prompts) != b:
            raise SystemExit(f"batch size {b}: only 1 and up to {len(BATCH_PROMPTS)} are set up")
        run_minipt, run_hf = runners(ours, hf, prompts, args.new_tokens, tok.pad_id, device=args.device)
        # llama.cpp decodes one sequence at a time: batch 1 only; on the CPU, and from the real GGUF
        run_llama_cpp = (llama_cpp_runner(prompts[0], args.new_tokens, torch.get_num_threads())
                         if b == 1 and args.llama_cpp and not cuda and not RANDOM else None)
        name = f"batch {b}" + (" (left padded)" if b > 1 else "")
        cases.append(bench_case(name, run_minipt, run_hf, b * args.new_tokens, args.repeats, run_llama_cpp,
                                args.device))

    import transformers
    info = {"dtype": args.dtype, "packed": fidelity, "compiled": args.compile, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "llama_cpp": _version("llama-cpp-python"), "device": args.device, "random_shape": RANDOM,
            "gpu": torch.cuda.get_device_name(args.device) if cuda else None}
    how = args.dtype + (", minipt packed" if args.packed else "") + (", compiled" if args.compile else "")
    where = (f" on {info['gpu']}" if cuda else "") + (f", random {RANDOM} weights" if RANDOM else "")
    print(f"\ngreedy, {args.new_tokens} new tokens per row, {how}{where}, median of {args.repeats}, "
          f"{info['threads']} threads (torch {info['torch']}, transformers {info['transformers']})\n")
    print_cases(cases, "transformers")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "cases": cases}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
