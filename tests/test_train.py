"""train.py end to end on tiny random models with real vocabularies: config parsing,
falling loss for every method, exact resume after a crash, DDP equivalence, and the whole
T5 path (no real T5 weights exist on this machine)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from minipt.checkpoint import load_base
from minipt.convert import convert
from minipt.evaluation import rank_classify
from minipt.prompts import load
from minipt.prompts.base import drop_unread
from minipt.tasks import load_task
from minipt import training
from minipt.train_config import TrainConfig, field_comments, parse_train_config

from conftest import DEVICE, ranks_fit, save_tiny_hf, tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """64 real sentiment rows as a JSONL task (80/10/10 split, labels negative/positive)."""
    rows = load_task("sentiment").splits["train"][:64]
    path = tmp_path_factory.mktemp("task") / "sentiment64.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    save_tiny_hf(tiny_hf_model("llama", vocab_size=49152), root / "hf")  # SmolLM2's tokenizer
    convert(root / "hf", root / "minipt")
    return root / "minipt"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    import transformers
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    save_tiny_hf(transformers.T5ForConditionalGeneration(cfg).eval(), root / "hf")
    convert(root / "hf", root / "minipt")
    return root / "minipt"


def args(base, task, out, **over):
    values = dict(base=base, data=task, template="Review: {input}\nSentiment:", out_dir=out, steps=6,
                  batch_size=4, lr=0.05, warmup_steps=0, schedule="constant", log_interval=1, eval_interval=3,
                  ckpt_interval=0, eval_examples=6, max_len=96, num_virtual_tokens=4, init="random",
                  dtype="float32", encoder_hidden=16, projection_hidden=16, adapter_layers=1, lora_r=2,
                  device=DEVICE)
    values.update(over)
    return [f"--{k}={v}" for k, v in drop_unread(values).items()]   # one set of settings for every method


def train_losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def logged_test_row(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][-1]


def reloaded_test_accuracy(out, base_dir, task_file):
    """The test accuracy of the saved prompt file, reloaded onto a fresh base."""
    base, tok = load_base(base_dir, device=DEVICE)
    model = load(Path(out) / "prompt.safetensors", base, tok)
    task = load_task(str(task_file))
    return rank_classify(model, tok, task.splits["test"], "Review: {input}\nSentiment:", task.labels)[0]


# ---- configuration -----------------------------------------------------------------------

def test_config_overrides_file_and_types(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text('"""a run"""\nsteps = 7\nlr = 1\nlora_targets = ["q_proj"]\n')
    cfg = parse_train_config([str(cfg_file), "--steps=9", "--grad_checkpointing", "--method=lora"])
    assert (cfg.steps, cfg.lr, cfg.lora_targets, cfg.grad_checkpointing) == (9, 1.0, ["q_proj"], True)
    assert isinstance(cfg.lr, float)
    assert parse_train_config(["--method=prefix_tuning",
                               "--prefix_projection=none"]).prefix_projection is None


@pytest.mark.parametrize("argv, words", [
    (["--stepz=3"], ["unknown key 'stepz'", "valid keys:", "steps"]),
    (["--steps=many"], ["--steps=many", "int"]),
    (["--resume=perhaps"], ["boolean"]),
    (["--method=magic"], ["magic", "prompt_tuning"]),
])
def test_config_errors(argv, words):
    with pytest.raises(ValueError) as err:
        parse_train_config(argv)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_config_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("steps = 3\nimport os\n")
    with pytest.raises(ValueError, match=r"bad.py:2: only `key = value`"):
        parse_train_config([str(bad)])
    bad.write_text("steps = 3\nlr = 'fast'\n")
    with pytest.raises(ValueError, match=r"bad.py:2: lr='fast': expected float"):
        parse_train_config([str(bad)])


def test_cli_rejects_bad_key_with_exit_code(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--nope=1"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "unknown key 'nope'" in run.stderr and run.stderr.strip().count("\n") == 0


# ---- training ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter",
                                    "lora", "full"])
def test_every_method_trains_with_falling_loss(method, llama_dir, task_file, tmp_path):
    lr = 1e-3 if method == "full" else 0.05
    train.main(args(llama_dir, task_file, tmp_path, method=method, steps=8, lr=lr, eval_interval=0))
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert (tmp_path / "prompt.safetensors").exists() and (tmp_path / "config.json").exists()


def test_outputs_and_reload_give_the_reported_accuracy(llama_dir, task_file, tmp_path):
    train.main(args(llama_dir, task_file, tmp_path))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["steps"] == 6 and saved["method"] == "prompt_tuning"
    assert reloaded_test_accuracy(tmp_path, llama_dir, task_file) == logged_test_row(tmp_path)["accuracy"]


def test_prompt_transfer_starts_from_the_given_prompt(llama_dir, task_file, tmp_path):
    train.main(args(llama_dir, task_file, tmp_path / "source", steps=3, eval_interval=0))
    source = tmp_path / "source" / "prompt.safetensors"
    # lr 0 and no weight decay: the transferred prompt must come out exactly as it went in
    train.main(args(llama_dir, task_file, tmp_path / "target", steps=1, eval_interval=0, init_from=source,
                    lr=0.0, weight_decay=0.0))
    base, tok = load_base(llama_dir)
    a, b = (load(p, base, tok).method.prompt for p in (source, tmp_path / "target" / "prompt.safetensors"))
    assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="a prompt_tuning prompt cannot initialise prefix_tuning"):
        train.main(args(llama_dir, task_file, tmp_path / "bad", steps=1, init_from=source,
                        method="prefix_tuning"))


def test_resume_after_a_crash_is_exact(llama_dir, task_file, tmp_path, monkeypatch, capsys):
    # dropout: the RNG must be restored too
    common = dict(steps=6, ckpt_interval=3, method="lora", lora_dropout=0.1)
    train.main(args(llama_dir, task_file, tmp_path / "straight", **common))

    real_save = training.save_checkpoint

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt  # the process dies right after the step-3 checkpoint
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(llama_dir, task_file, tmp_path / "crashed", **common))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    capsys.readouterr()
    train.main(args(llama_dir, task_file, tmp_path / "crashed", resume=True, **common))
    assert "(from the checkpoint)" in capsys.readouterr().out  # the base is not measured again

    a = load(tmp_path / "straight" / "prompt.safetensors", load_base(llama_dir)[0]).method.state_for_saving()
    b = load(tmp_path / "crashed" / "prompt.safetensors", load_base(llama_dir)[0]).method.state_for_saving()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "crashed")
    straight, crashed = logged_test_row(tmp_path / "straight"), logged_test_row(tmp_path / "crashed")
    assert (straight["zero_shot"], straight["accuracy"]) == (crashed["zero_shot"], crashed["accuracy"])


@ranks_fit(2)
def test_ddp_two_processes_equal_one(llama_dir, task_file, tmp_path):
    common = args(llama_dir, task_file, tmp_path / "one", steps=3, batch_size=4, eval_interval=0)
    train.main(common)
    two = args(llama_dir, task_file, tmp_path / "two", steps=3, batch_size=4, eval_interval=0)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29533", "train.py", *two],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    a = load(tmp_path / "one" / "prompt.safetensors", load_base(llama_dir)[0]).method.prompt
    b = load(tmp_path / "two" / "prompt.safetensors", load_base(llama_dir)[0]).method.prompt
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_t5_end_to_end(method, t5_dir, task_file, tmp_path):
    train.main(args(t5_dir, task_file, tmp_path, method=method, steps=8, lr=0.1))
    losses = train_losses(tmp_path)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert reloaded_test_accuracy(tmp_path, t5_dir, task_file) == logged_test_row(tmp_path)["accuracy"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_describes_every_key(flag, capsys):
    train.main(["--steps=3", flag])
    text = capsys.readouterr().out
    described = {line.split()[0][2:]: line for line in text.splitlines() if line.startswith("  --")}
    assert set(described) == {f.name for f in dataclasses.fields(TrainConfig)}
    comments = field_comments()
    undescribed = [k for k in described if not comments.get(k) or not described[k].endswith(comments[k])]
    assert not undescribed, f"no comment after these fields in PromptConfig / TrainConfig: {undescribed}"
    assert described["lr"].split()[1:5] == ["float", "|", "None", "(recipe)"]


@pytest.mark.parametrize("capability, frozen", [("AVX2", "float32"), ("DEFAULT", "float32"),
                                                ("AVX512", "bfloat16")])
def test_dtype_auto_is_bf16_only_where_the_cpu_multiplies_it(capability, frozen, llama_dir, task_file,
                                                             tmp_path, monkeypatch, capsys):
    """On an AVX2-only CPU PyTorch multiplies bf16 in a scalar fallback, ~100x slower than fp32."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    loaded = []
    real_load_base = train.load_base
    monkeypatch.setattr(train, "load_base", lambda *a, **k: loaded.append(k["dtype"]) or real_load_base(*a, **k))
    train.main(args(llama_dir, task_file, tmp_path, dtype="auto", steps=1, eval_interval=0, device="cpu"))
    assert loaded == [getattr(torch, frozen)]
    assert f"dtype=auto: {frozen} on this cpu" in capsys.readouterr().out
