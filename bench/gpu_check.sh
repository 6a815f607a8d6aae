#!/usr/bin/env bash
# The GPU check of issue #36, in one call on a fresh GPU machine without network:
#
#     bash bench/gpu_check.sh                 # results in $OUT if set, else bench/results/gpu/
#     DEVICE=cpu bash bench/gpu_check.sh      # the same stages on a CPU (a dry run of the script)
#     ONLY="fixtures resume" bash bench/gpu_check.sh     # some stages only (a rerun of failed ones)
#
# It needs only what such a machine has: python3 with torch, transformers, peft, safetensors,
# sentencepiece and pytest, and this working tree (no .venv, no weights/, nothing fetched;
# minipt is imported from here through PYTHONPATH). Every model is built here: a tiny random
# llama-style checkpoint with a byte-level tokenizer for the runs of train.py and generate.py,
# and random weights in the real shapes of SmolLM2-135M and Qwen2.5-0.5B for the benchmarks
# (bench/random_bases.py). Stages, each under `timeout`, all of them within BUDGET seconds
# (default 465, under 8 minutes with the start), each writing NAME.log beside summary.txt:
#
#   env          nvidia-smi -L (names the GPU), the versions
#   tests        MINIPT_DEVICE=cuda pytest -x on the files that take the device from it
#                (tests/test_cuda_policy.py, tests/test_device.py), what needs a download skipped
#   fixtures     the tiny checkpoint and a 64-row classification task (JSONL)
#   methods      one train.py run of every method, bf16, a few steps each
#   sampling     generate.py sampling twice with one seed (same text) and once with another
#   resume       train.py killed (SIGKILL) after a checkpoint, resumed: bit-equal to a straight run
#   torchrun     torchrun --nproc_per_node=1 train.py (NCCL on a GPU)
#   bases        the random SmolLM2-135M and Qwen2.5-0.5B bases (CPU, ~2 GB written)
#   bench-generate  bench/bench_generate.py: batch 1 and 8 against transformers' generate, Qwen2.5-0.5B shape
#   bench        bench/bench.py train (text-8x512, cls-16x64; every method; minipt bf16 against
#                peft bf16) and generate (with the soft prompt), SmolLM2-135M shape
#   bench-plain  bench/bench.py train, minipt with its speed layer on and off (MINIPT_PLAIN=1),
#                on the padded classification shape, where unpadding acts
#
# A failed stage does not stop the later ones; the exit status is the number that failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/results/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BUDGET=${BUDGET:-465}
ONLY=${ONLY:-}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
export PYTHONPATH=$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # minipt, random_bases
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINIPT_CACHE=$WORK/no-downloads      # nothing cached: what would fetch must not be run here
export WORK DEVICE PY

# stage NAME SECONDS CMD...: CMD under `timeout`, capped by what is left of BUDGET; output to NAME.log
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "$name: not run, out of time" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
        return
    fi
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict="TIMED OUT after ${limit}s"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED (exit $rc)"
    ((rc != 0)) && FAILED=$((FAILED + 1))
    printf '%-16s %-28s %4ds\n' "$name" "$verdict" $((SECONDS - t0)) | tee -a "$SUMMARY"
}

# ---- env -------------------------------------------------------------------------------------
env_info() {
    if [ "$DEVICE" != cpu ]; then nvidia-smi -L && nvidia-smi; fi
    "$PY" - <<'EOF'
import platform, torch, transformers, peft
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          "bf16 without emulation:", torch.cuda.is_bf16_supported(including_emulation=False))
EOF
}
export -f env_info
stage env 30 bash -c env_info
[ "$DEVICE" != cpu ] && [ -f "$OUT/env.log" ] && cp "$OUT/env.log" "$OUT/gpu.txt"

# ---- tests under the device switch ----------------------------------------------------------
# The files whose tests take the device from MINIPT_DEVICE; a test that would fetch a file (a
# real tokenizer or base for the tiny parity models) is skipped, saying so, by this plugin.
mkdir -p "$WORK/plugins"
cat > "$WORK/plugins/no_downloads.py" <<'EOF'
import pytest
import minipt.fetch


def skip(name, *args, **kwargs):
    pytest.skip(f"needs a download ({name}): none on this machine")


minipt.fetch.fetch = skip
EOF
stage tests 120 env MINIPT_DEVICE="$DEVICE" PYTHONPATH="$PYTHONPATH:$WORK/plugins" \
    "$PY" -m pytest -q -x -rs -p no_downloads -p no:cacheprovider tests/test_cuda_policy.py tests/test_device.py

# ---- fixtures: a tiny base and a task ----------------------------------------------------------
stage fixtures 60 "$PY" - <<'EOF'
import json, os, random
from pathlib import Path
import torch
from safetensors.torch import save_file
from minipt.config import GPTConfig, save_config
from minipt.gpt import GPT
from random_bases import byte_tokenizer
work = Path(os.environ["WORK"])
torch.manual_seed(0)
cfg = GPTConfig(vocab_size=259,                     # the byte tokenizer's ids, every one decodable
                n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, intermediate_size=128,
                max_seq_len=512, norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, proj_bias=False,
                tie_embeddings=False, source="llama")
(work / "tiny").mkdir()
save_config(cfg, work / "tiny")
save_file({k: v.contiguous() for k, v in GPT(cfg).state_dict().items()}, work / "tiny" / "model.safetensors")
byte_tokenizer().save(work / "tiny")
rng = random.Random(0)
words = ["fine", "dull", "great", "awful", "moving", "flat", "bright", "grim"]
rows = [{"input": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))),
         "target": rng.choice([" yes", " no"])} for _ in range(64)]
(work / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
print("tiny base and task in", work)
EOF

# ---- a train.py run of every method, bf16 ------------------------------------------------------
stage methods 100 "$PY" - <<'EOF'
import os, subprocess, sys, time
from minipt.prompts.base import REGISTRY, drop_unread
work, device = os.environ["WORK"], os.environ["DEVICE"]
failed = 0
for method in REGISTRY:
    settings = drop_unread(dict(
        base=f"{work}/tiny", data=f"{work}/task.jsonl", template="{input} ->", method=method, device=device,
        dtype="bfloat16", steps=3, batch_size=4, log_interval=1, eval_interval=0, eval_examples=4, ckpt_interval=0,
        num_virtual_tokens=4, init="random", encoder_hidden=16, projection_hidden=16, adapter_layers=1, lora_r=2,
        out_dir=f"{work}/methods/{method}", overwrite=True))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in settings.items())],
                         capture_output=True, text=True, timeout=60)
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    print(f"{method:<14} exit {run.returncode}  {time.perf_counter() - t0:5.1f} s  {steps[-1] if steps else ''}")
    if run.returncode:
        failed += 1
        print(run.stdout[-1500:], run.stderr[-3000:], sep="\n")
sys.exit(failed)
EOF

# ---- seeded sampling --------------------------------------------------------------------------
stage sampling 60 "$PY" - <<'EOF'
import os, subprocess, sys
work, device = os.environ["WORK"], os.environ["DEVICE"]
def sample(seed):
    cmd = [sys.executable, "generate.py", "--base", f"{work}/tiny", "--text", "fine great", "--text", "dull",
           "--temperature", "0.9", "--top-k", "50", "--max-new-tokens", "24", "--seed", str(seed),
           "--device", device]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
a, b, c = sample(7), sample(7), sample(8)
print(a, c, sep="\n---\n")
assert a == b, "one seed, two different samples"
assert a != c, "two seeds, one sample"
print("seeded sampling: the same text for one seed twice, another for another seed")
EOF

# ---- resume after SIGKILL ---------------------------------------------------------------------
stage resume 90 "$PY" - <<'EOF'
import json, os, signal, subprocess, sys
from pathlib import Path
import torch
from minipt.prompts.base import drop_unread
from minipt.tensorfile import read_tensors
work, device = Path(os.environ["WORK"]), os.environ["DEVICE"]
def argv(out, **over):
    settings = dict(base=work / "tiny", data=work / "task.jsonl", template="{input} ->", method="lora",
                    lora_dropout=0.1, lora_r=2, device=device, dtype="bfloat16", steps=8, batch_size=4,
                    log_interval=1, eval_interval=0, eval_examples=4, ckpt_interval=2, out_dir=out, **over)
    return [sys.executable, "train.py", *(f"--{k}={v}" for k, v in drop_unread(settings).items())]
def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
straight = subprocess.run(argv(work / "straight"), capture_output=True, text=True, timeout=60)
assert straight.returncode == 0, straight.stderr[-3000:]
run = subprocess.Popen(argv(work / "killed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
for line in run.stdout:
    if line.startswith(f"step {5:5d}/"):              # checkpoints at steps 2 and 4 are written
        run.send_signal(signal.SIGKILL)
        break
assert run.wait() == -signal.SIGKILL, "the run ended before step 5"
resumed = subprocess.run(argv(work / "killed", resume=True), capture_output=True, text=True, timeout=60)
assert resumed.returncode == 0, resumed.stderr[-3000:]
assert "resumed from" in resumed.stdout, resumed.stdout[-2000:]
a, b = (read_tensors(d / "prompt.safetensors") for d in (work / "straight", work / "killed"))
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
assert losses(work / "killed") == losses(work / "straight"), (losses(work / "killed"), losses(work / "straight"))
print("killed at step 5, resumed: the same LoRA weights and losses, bit for bit:", losses(work / "straight"))
EOF

# ---- torchrun, one process per GPU ------------------------------------------------------------
stage torchrun 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    --base="$WORK/tiny" --data="$WORK/task.jsonl" --template="{input} ->" --method=prompt_tuning \
    --num_virtual_tokens=4 --init=random --device="$DEVICE" --dtype=bfloat16 --steps=3 --batch_size=4 \
    --log_interval=1 --eval_interval=0 --eval_examples=4 --ckpt_interval=0 --out_dir="$WORK/torchrun"

# ---- the benchmarks, on random weights in the real shapes -------------------------------------
if [ "$DEVICE" = cpu ]; then     # a dry run: the smallest settings, SmolLM2's shape only
    SHAPES=(smollm2-135m)
    GEN=(--random-shape smollm2-135m --repeats 1 --new-tokens 4 --batch-sizes 1)
    BENCH=(--shapes text-2x32,cls-4x16 --methods prompt_tuning --steps 1 --warmup 1 --gen-repeats 1 --new-tokens 4
           --gen-batch-sizes 1 --gen-dtypes float32)
    PLAIN=(--shapes cls-4x16 --steps 1 --warmup 1)
else
    SHAPES=(smollm2-135m qwen2.5-0.5b)
    GEN=(--random-shape qwen2.5-0.5b --repeats 3 --new-tokens 64 --batch-sizes 1,8)
    BENCH=(--shapes text-8x512,cls-16x64 --steps 5 --warmup 2 --gen-repeats 3 --new-tokens 64 --gen-dtypes bfloat16)
    PLAIN=(--shapes cls-16x64 --steps 5 --warmup 2)
fi
stage bases 120 "$PY" bench/random_bases.py "${SHAPES[@]}"
stage bench-generate 100 "$PY" bench/bench_generate.py --device "$DEVICE" --dtype bfloat16 --no-llama-cpp \
    "${GEN[@]}" --json "$OUT/bench_generate.json"
stage bench 240 "$PY" bench/bench.py --device "$DEVICE" --random-shape smollm2-135m --only train,generate \
    --configs minipt-bfloat16,peft-bfloat16 --gen-lookup 0 "${BENCH[@]}" --json "$OUT/bench.json"
# the speed layer (minipt/fast.py: unpadding, custom backward passes) on and off, to keep each
# only where it wins on this device
stage bench-plain 120 "$PY" bench/bench.py --device "$DEVICE" --random-shape smollm2-135m --only train \
    --configs minipt-bfloat16,minipt-plain-bfloat16 --methods prompt_tuning,lora "${PLAIN[@]}" \
    --json "$OUT/bench_plain.json"

echo "total $((SECONDS - START)) s; $FAILED stage(s) failed; logs in $OUT" | tee -a "$SUMMARY"
exit "$FAILED"
