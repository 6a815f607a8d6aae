"""Crash safety: a run killed with SIGKILL at a random step and resumed with --resume ends
with the same prompt, bit for bit, as a run never interrupted; a kill in the middle of a
write leaves the previous file whole under its name; an earlier run in out_dir is replaced
only with --overwrite."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from minipt.tensorfile import read_tensors

from test_bad_input import stops
from test_train import args, llama_dir, task_file, train_losses  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
# one thread: the runs compared bit for bit must add up their floats in the same order
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_sigkill_at_a_random_step_then_resume_is_exact(llama_dir, task_file, tmp_path):
    # dropout: RNG restored too
    common = dict(steps=8, ckpt_interval=2, eval_interval=0, method="lora", lora_dropout=0.1)
    train_py = [sys.executable, "train.py"]
    straight = subprocess.run([*train_py, *args(llama_dir, task_file, tmp_path / "straight", **common)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    kill_at = random.randint(3, 7)  # a checkpoint exists from step 2 on
    out = tmp_path / "killed"
    run = subprocess.Popen([*train_py, *args(llama_dir, task_file, out, **common)], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in run.stdout:
        if line.startswith(f"step {kill_at:5d}/"):
            run.send_signal(signal.SIGKILL)
            break
    assert run.wait() == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert not (out / "prompt.safetensors").exists()
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it

    resumed = subprocess.run([*train_py, *args(llama_dir, task_file, out, resume=True, **common)],
                             cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = (read_tensors(d / "prompt.safetensors") for d in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {kill_at}"
    assert train_losses(out) == train_losses(tmp_path / "straight"), f"killed at step {kill_at}"
    assert not list(out.glob(".*.tmp"))


WRITERS = {
    # checkpoints, config.json, metrics.jsonl (first write) and plot.png all go through atomic_write
    "atomic_write": """
from minipt.fileio import atomic_write
def write(data):
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
def die_halfway(data):
    def half(tmp):
        Path(tmp).write_bytes(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(path, half)
""",
    "prompt file": """
from minipt.prompts import files
from minipt.config import GPTConfig
from minipt.gpt import GPT
from minipt.prompts import PromptConfig, attach
torch.manual_seed(0)
model = attach(GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, head_dim=4,
                             intermediate_size=16, max_seq_len=16)),
               PromptConfig(num_virtual_tokens=2, init="random"))
def write(data):
    files.save_prompt(path, model)
def die_halfway(data):
    real = files.save_file
    def half(tensors, tmp, metadata):
        real(tensors, tmp, metadata=metadata)
        Path(tmp).write_bytes(Path(tmp).read_bytes()[:100])
        os.kill(os.getpid(), signal.SIGKILL)
    files.save_file = half
    with torch.no_grad():
        model.method.prompt.add_(1)
    files.save_prompt(path, model)
""",
}


@pytest.mark.parametrize("writer", WRITERS)
def test_kill_during_a_write_keeps_the_previous_file(writer, tmp_path):
    path = tmp_path / "file"
    script = f"""import os, signal, sys, torch
from pathlib import Path
path = Path(sys.argv[1])
{WRITERS[writer]}
write(b"the previous file, whole")
before = path.read_bytes()
Path(sys.argv[2]).write_bytes(before)
die_halfway(b"the next file, which never gets written completely")
"""
    run = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "before")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert path.read_bytes() == (tmp_path / "before").read_bytes()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("file", "before")]
    assert (len(leftovers) == 1 and leftovers[0].startswith(".file.")
            and leftovers[0].endswith(".tmp")), leftovers


def test_overwrite_replaces_an_earlier_run_only_when_asked(llama_dir, task_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"config.json": b"{}", "checkpoint.pt": b"an earlier run's checkpoint",
               "metrics.jsonl": b'{"kind": "train", "step": 99, "loss": 9.0}\n'}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    stops(lambda: train.main(args(llama_dir, task_file, out, steps=2)), "holds an earlier run", "--overwrite")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n")
    stops(lambda: train.main(args(llama_dir, bad, out, steps=2, overwrite=True)), "bad.jsonl:1:")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # a refused run destroys nothing

    train.main(args(llama_dir, task_file, out, steps=2, eval_interval=0, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "plot.png",
                                                     "prompt.safetensors"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 2]


def test_resume_survives_a_metrics_line_cut_short(llama_dir, task_file, tmp_path):
    out = tmp_path / "out"
    common = dict(steps=4, ckpt_interval=2, eval_interval=0)
    train.main(args(llama_dir, task_file, out, **common))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a kill in the middle of an append
    train.main(args(llama_dir, task_file, out, resume=True, **common))
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 4]


def test_every_run_file_is_written_through_atomic_write(llama_dir, task_file, tmp_path, monkeypatch):
    """What the kill test above proves of atomic_write holds for the run's files only if
    train.py writes each of them through it."""
    from minipt import fileio, training
    from minipt.prompts import files
    written, real = [], fileio.atomic_write

    def recording(path, write):
        written.append(Path(path).name)
        real(path, write)
    for module in (train, training, files):
        monkeypatch.setattr(module, "atomic_write", recording)
    train.main(args(llama_dir, task_file, tmp_path / "out", steps=4, ckpt_interval=2, eval_interval=0))
    assert ({"config.json", "checkpoint.pt", "metrics.jsonl", "plot.png", "prompt.safetensors"}
            <= set(written)), written


def resumable_run(llama_dir, task_file, out):
    train.main(args(llama_dir, task_file, out, steps=4, ckpt_interval=2, eval_interval=0))
    (out / "prompt.safetensors").unlink()          # as if killed after the checkpoint at step 2
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    return args(llama_dir, task_file, out, steps=4, ckpt_interval=2, eval_interval=0, resume=True)


@pytest.mark.parametrize("key, value", [("base", "copy"), ("data", "copy"),
                                        ("template", "Text: {input}\nLabel:"),
                                        ("optimizer", "adafactor"), ("num_virtual_tokens", 5)])
def test_resume_refuses_a_changed_setting(key, value, llama_dir, task_file, tmp_path):
    out = tmp_path / "out"
    argv = resumable_run(llama_dir, task_file, out)
    if value == "copy":                              # the same content at another path is another run
        source = {"base": llama_dir, "data": task_file}[key]
        value = tmp_path / f"copy{source.suffix}"
        if source.is_dir():
            import shutil
            shutil.copytree(source, value)
        else:
            value.write_bytes(source.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stops(lambda: train.main(argv + [f"--{key}={value}"]), f"the run being resumed has {key}=", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_accepts_changed_steps_and_intervals(llama_dir, task_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = resumable_run(llama_dir, task_file, out)
    train.main(argv + ["--steps=6", "--log_interval=3", "--eval_interval=3", "--ckpt_interval=0"])
    assert "resumed from" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 6]   # log_interval 1 before, then 3
    assert ([r["step"] for r in rows if r["kind"] == "valid"] == [3, 6]
            and (out / "prompt.safetensors").exists())


def test_a_checkpoint_that_would_run_code_is_refused(llama_dir, task_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = resumable_run(llama_dir, task_file, out)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**state, "step": Evil()}, out / "checkpoint.pt")
    monkeypatch.setattr(train, "load_base", lambda *a, **k: pytest.fail("the base loaded before the refusal"))
    stops(lambda: train.main(argv), "checkpoint.pt: refused, the pickle holds more than tensors", "system")
    assert not marker.exists()
