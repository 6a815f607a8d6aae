"""`train.py --shard=fsdp` under torchrun, two gloo ranks on the CPU (NCCL ranks on GPUs under
MINIPT_DEVICE=cuda): sharding the frozen base changes where its weights live, not the math.
Each sharded run must give the losses and the prompt file of a one-process run of the same
global batch (up to fp32 reduction order), hold half the base per rank, and resume exactly.
The refusals (one process, full fine-tuning, the adapter, T5, compile) are in test_bad_input."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import train
from minipt.checkpoint import load_base
from minipt.prompts.files import read_prompt

from conftest import ranks_fit
from test_train import ROOT, args, llama_dir, task_file, train_losses  # noqa: F401 (fixtures)

pytestmark = ranks_fit(2)

# short runs; every method's reading of the shared settings is test_train.args'
COMMON = dict(steps=4, batch_size=4, eval_interval=0, lr=0.01)
CASES = {
    "prompt_tuning": dict(method="prompt_tuning", grad_accum=2),
    "p_tuning_v2 (prefixes in every layer), grad checkpointing": dict(method="p_tuning_v2",
                                                                     grad_checkpointing=True),
    "lora (inside the blocks), grad checkpointing": dict(method="lora", grad_checkpointing=True,
                                                         ckpt_interval=2),
}


def torchrun(argv):
    """train.py on two ranks, sharded; its output."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *argv, "--shard=fsdp"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def prompt_tensors(out):
    return read_prompt(out / "prompt.safetensors")[1]


@pytest.fixture(scope="module")
def sharded(llama_dir, task_file, tmp_path_factory):
    """case -> (out_dir, stdout) of its sharded run, run once."""
    runs = {}

    def get(case):
        if case not in runs:
            out = tmp_path_factory.mktemp("fsdp") / "two"
            runs[case] = out, torchrun(args(llama_dir, task_file, out, **COMMON, **CASES[case]))
        return runs[case]
    return get


@pytest.mark.parametrize("case", CASES)
def test_sharded_run_equals_one_process(case, sharded, llama_dir, task_file, tmp_path, one_thread):
    out, _ = sharded(case)
    train.main(args(llama_dir, task_file, tmp_path / "one", **COMMON, **CASES[case]))
    assert train_losses(out) == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    a, b = prompt_tensors(tmp_path / "one"), prompt_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_each_rank_holds_half_the_frozen_base(sharded, llama_dir):
    _, stdout = sharded("prompt_tuning")
    found = re.findall(r"fsdp: rank (\d) holds ([\d,]+) of ([\d,]+) frozen weight bytes", stdout)
    held = {int(r): int(h.replace(",", "")) for r, h, _ in found}
    wholes = {int(w.replace(",", "")) for _, _, w in found}
    base = load_base(llama_dir)[0]                                    # fp32, as the runs load it
    assert wholes == {sum(p.numel() * p.element_size() for p in base.parameters())}
    whole = wholes.pop()
    assert set(held) == {0, 1} and sum(held.values()) == whole
    assert all(abs(h / whole - 0.5) < 0.01 for h in held.values()), (held, whole)


def test_resume_under_fsdp_is_exact(sharded, llama_dir, task_file, tmp_path):
    """Resume from the step-2 checkpoint a finished sharded run left (the process state gone
    as after a kill): steps 3 and 4 again, bit for bit."""
    case = "lora (inside the blocks), grad checkpointing"
    straight, _ = sharded(case)
    out = tmp_path / "resumed"
    shutil.copytree(straight, out)
    (out / "prompt.safetensors").unlink()
    stdout = torchrun(args(llama_dir, task_file, out, resume=True, **COMMON, **CASES[case]))
    assert f"resumed from {out / 'checkpoint.pt'} at step 2" in stdout
    assert train_losses(out) == train_losses(straight)
    a, b = prompt_tensors(straight), prompt_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]
