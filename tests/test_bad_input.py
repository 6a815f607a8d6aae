"""The bad-input catalogue: every case stops `train.py` or `python -m minipt.convert` with one
line `error: ...` that names the cause (file and line, key, expected size), exit status 1, no
traceback, and nothing written. The CLIs run in-process (a subprocess costs seconds per case
here); `sys.exit(message)` is what makes Python print the line and exit with status 1, and
test_cli_error_is_one_line_and_status_1 checks that end to end once.

Choices the cases pin down: an input longer than `max_len` is truncated from the left with a
one-time warning; `max_len` plus the virtual tokens beyond the model's context is refused."""
import dataclasses
import json
import os
import struct
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import train
from minipt import convert
from minipt.checkpoint import load_base
from minipt.fetch import fetch
from minipt.prompts import PromptConfig, attach, save
from minipt.prompts.base import METHODS, fields_read
from minipt.tensorfile import read_tensors
from minipt.train_config import TrainConfig, parse_train_config

from conftest import ranks_fit
from test_train import args, llama_dir, t5_dir, task_file  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def stops(run, *words):
    """run() must end in sys.exit with one line `error: ...` holding every word; the line."""
    with pytest.raises(SystemExit) as stop:
        run()
    line = stop.value.code
    assert isinstance(line, str), f"exit code {line!r}, expected a message (exit status 1)"
    assert line.startswith("error: ") and "\n" not in line, line
    assert all(w in line for w in words), line
    return line


@pytest.fixture
def no_base_load(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("the base model loaded before the refusal")
    monkeypatch.setattr(train, "load_base", loaded)


# ---- files the cases are made of ------------------------------------------------------------

def jsonl(*lines):
    def make(t):
        path = t.tmp / "bad.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        return path
    return make


def rows(n, targets=(" negative", " positive")):
    return jsonl(*(json.dumps({"input": f"review number {i}", "target": targets[i % len(targets)]})
                   for i in range(n)))


def base_copy(change):
    """The tiny llama checkpoint, copied and changed by change(directory)."""
    def make(t):
        d = t.tmp / "base"
        d.mkdir()
        for f in t.llama.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        change(d)
        return d
    return make


def prompt_file(t, base_dir):
    base, tok = load_base(base_dir)
    cfg = PromptConfig(method="prompt_tuning", num_virtual_tokens=4, init="random")
    return save(attach(base, cfg, tok), t.tmp / "prompt.safetensors", tok)


def other_weights(d):
    sd = read_tensors(d / "model.safetensors")
    sd["embed.weight"] = sd["embed.weight"] + 1
    save_file(sd, d / "model.safetensors")


def junk(name, data):
    def make(t):
        path = getattr(t, "tmp", t) / name
        path.write_bytes(data)
        return path
    return make


def raw_safetensors(path, header: dict, data=bytes(64)):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])
    return path


def earlier_run(method):
    def make(t):
        t.out.mkdir()
        saved = dataclasses.asdict(parse_train_config(args(t.llama, t.task, t.out, method=method)))
        (t.out / "config.json").write_text(json.dumps(saved))
        (t.out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
        return t.out
    return make


# name, overrides of test_train.args (a callable value is built from the fixtures), words of the message
TRAIN_CASES = [
    ("malformed JSONL", dict(data=jsonl('{"input": "a", "target": " x"}', '{"input": "b" "target": " y"}')),
     ["bad.jsonl:2:", "not valid JSON"]),
    ("row not an object", dict(data=jsonl('["a", " x"]')),
     ["bad.jsonl:1:", "expected a JSON object, got list"]),
    ("missing input", dict(data=jsonl('{"input": "a", "target": " x"}', '{"target": " y"}')),
     ["bad.jsonl:2:", "missing 'input'"]),
    ("missing target", dict(data=jsonl('{"input": "a"}')), ["bad.jsonl:1:", "missing 'target'"]),
    ("target not a string", dict(data=jsonl('{"input": "a", "target": 1}')),
     ["bad.jsonl:1:", "'target' must be a string"]),
    ("target tokenizes to nothing",
     dict(data=jsonl('{"input": "a", "target": " x"}', '{"input": "b", "target": " "}')),
     ["bad.jsonl:2:", "'target' is empty"]),
    ("empty dataset", dict(data=jsonl("", "  ")), ["bad.jsonl: no rows"]),
    ("data file missing", dict(data=lambda t: t.tmp / "nowhere.jsonl"),
     ["nowhere.jsonl: no such file", "sentiment"]),
    ("split smaller than the batch", dict(data=rows(12), batch_size=16),
     ["the train split has 9 rows", "fewer than one batch of 16"]),
    ("empty validation split", dict(data=rows(5), batch_size=2),
     ["the validation split is empty", "0 validation"]),
    ("labels that are the same tokens",
     dict(base=lambda t: t.t5, data=rows(12, ("positive", " positive", " negative"))),
     ["labels ' positive' and 'positive' are the same tokens [1465]"]),
    ("compile with an encoder-decoder", dict(base=lambda t: t.t5, compile=True),
     ["compile=true: compiled blocks are for decoder models", "is t5"]),
    ("unknown shard", dict(shard="zero3"), ["shard='zero3' unknown", "none, fsdp"]),
    ("fsdp in one process", dict(shard="fsdp"), ["shard=fsdp: this run is one process", "torchrun"]),
    ("fsdp for full fine-tuning", dict(shard="fsdp", method="full"),
     ["shard=fsdp shards the frozen base, and method=full trains all of it", "shard=none"]),
    ("fsdp for the adapter", dict(shard="fsdp", method="adapter"),
     ["shard=fsdp with method=adapter", "outside the blocks"]),
    ("fsdp with compile", dict(shard="fsdp", compile=True), ["shard=fsdp with compile=true"]),
    ("fsdp with an encoder-decoder", dict(base=lambda t: t.t5, shard="fsdp"),
     ["shard=fsdp: sharded blocks are for decoder models", "is t5"]),
    ("unknown base_quant", dict(base_quant="q3"), ["base_quant='q3' unknown", "none, gguf, int8"]),
    ("a quantized base fully fine-tuned", dict(base_quant="int8", method="full"),
     ["base_quant=int8 with method=full", "frozen"]),
    ("codes asked of a base without them", dict(base_quant="gguf"),
     ["base_quant=gguf", "codes.safetensors", "no codes", "base_quant=int8"]),
    ("a quantized encoder-decoder", dict(base=lambda t: t.t5, base_quant="int8"),
     ["base_quant=int8: for decoder bases", "not T5"]),
    ("fsdp with a quantized base", dict(shard="fsdp", base_quant="int8"),
     ["shard=fsdp with base_quant=int8", "buffers"]),
    ("max_len beyond the context", dict(max_len=200, num_virtual_tokens=4),
     ["max_len=200 + num_virtual_tokens=4 = 204 positions", "context of 128"]),
    ("virtual tokens push past the context", dict(max_len=100, num_virtual_tokens=40),
     ["max_len=100 + num_virtual_tokens=40 = 140 positions", "context of 128"]),
    ("unknown key", dict(stepz=3), ["unknown key 'stepz'", "valid keys:", "steps"]),
    ("wrong value type", dict(steps="many"), ["--steps=many: expected int"]),
    ("wrong boolean", dict(resume="perhaps"), ["--resume=perhaps: expected a boolean"]),
    ("zero batch size", dict(batch_size=0), ["batch_size=0: must be at least 1"]),
    ("zero steps", dict(steps=0), ["steps=0: must be at least 1"]),
    ("negative grad_accum", dict(grad_accum=-2), ["grad_accum=-2: must be at least 1"]),
    ("negative learning rate", dict(lr=-0.1), ["lr=-0.1: must be at least 0"]),
    ("zero virtual tokens", dict(num_virtual_tokens=0), ["num_virtual_tokens=0: must be at least 1"]),
    ("unknown method", dict(method="magic"), ["method='magic': unknown", "prompt_tuning"]),
    ("unknown dtype", dict(dtype="float8"), ["dtype='float8' unknown", "bfloat16"]),
    ("unknown schedule", dict(schedule="exp"), ["schedule='exp' unknown", "cosine"]),
    ("unknown device", dict(device="tpu"), ["device='tpu' unknown"]),
    ("fp16 training", dict(dtype="float16"), ["dtype='float16': fp16 training needs loss scaling",
                                              "use dtype=bfloat16", "or float32"]),
    ("not a device", dict(device="cuda0"), ["device='cuda0': not a device", "use --device=cpu, cuda or cuda:N"]),
    ("prompt file for another base", dict(init_from=lambda t: prompt_file(t, base_copy(other_weights)(t))),
     ["init_from:", "trained on a different base model", "embedding hash"]),
    ("corrupt prompt file", dict(init_from=junk("p.safetensors", bytes(range(256)) * 16)),
     ["init_from:", "p.safetensors: not a readable safetensors file"]),
    ("truncated prompt file", dict(init_from=lambda t: cut(prompt_file(t, t.llama), 200)),
     ["init_from:", "prompt.safetensors: not a readable safetensors file"]),
    ("prompt file claims a 1 TB tensor", dict(init_from=lambda t: raw_safetensors(
        t.tmp / "big.safetensors",
        {"prompt": {"dtype": "F32", "shape": [2**20, 2**18], "data_offsets": [0, 2**40]}})),
     ["big.safetensors: not a readable safetensors file", "incomplete metadata"]),
    ("missing prompt file", dict(init_from=lambda t: t.tmp / "none.safetensors"),
     ["none.safetensors: no such prompt file"]),
    ("checkpoint directory without config", dict(base=base_copy(lambda d: (d / "config.json").unlink())),
     ["config.json: not found", "a minipt checkpoint?"]),
    ("config.json not JSON",
     dict(base=base_copy(lambda d: (d / "config.json").write_text('{"model_type": "gpt",\n}'))),
     ["config.json:2: invalid JSON"]),
    ("tokenizer file missing", dict(base=base_copy(lambda d: (d / "tokenizer.json").unlink())),
     ["no tokenizer.json or spiece.model"]),
    ("truncated weights", dict(base=base_copy(lambda d: cut(d / "model.safetensors", 100_000))),
     ["model.safetensors: tensor", "the data section has"]),
    ("resume without a checkpoint", dict(resume=True), ["checkpoint.pt: no checkpoint to resume from"]),
    ("resume with another method", dict(resume=True, method="p_tuning", out_dir=earlier_run("prompt_tuning")),
     ["the run being resumed has method='prompt_tuning', this one 'p_tuning'", "--overwrite"]),
    ("out_dir holds an earlier run", dict(out_dir=earlier_run("prompt_tuning")),
     ["holds an earlier run (config.json, metrics.jsonl)", "--resume", "--overwrite"]),
    ("resume and overwrite together", dict(resume=True, overwrite=True),
     ["resume and overwrite exclude each other"]),
]


@pytest.mark.parametrize("over, words", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses(over, words, llama_dir, t5_dir, task_file, tmp_path, no_base_load):
    t = SimpleNamespace(tmp=tmp_path, llama=llama_dir, t5=t5_dir, task=task_file, out=tmp_path / "out")
    over = {k: v(t) if callable(v) else v for k, v in over.items()}
    before = {p.name: p.read_bytes() for p in t.out.iterdir()} if t.out.exists() else None
    base = over.pop("base", llama_dir)
    stops(lambda: train.main(args(base, task_file, t.out, **over)), *words)
    after = {p.name: p.read_bytes() for p in t.out.iterdir()} if t.out.exists() else None
    assert after == before  # nothing created, nothing of an earlier run touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(llama_dir, task_file, tmp_path):
    stops(lambda: train.main(args(llama_dir, task_file, tmp_path / "out", device="cuda")),
          "device='cuda': CUDA is not available", "--device=cpu")
    assert not (tmp_path / "out").exists()


def test_a_gpu_beyond_the_machine_is_refused_before_loading(llama_dir, task_file, tmp_path, monkeypatch):
    import generate as generate_cli
    from minipt import serve
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module in (train, serve, generate_cli):
        monkeypatch.setattr(module, "load_base", None)                # a load would raise a TypeError
    stops(lambda: train.main(args(llama_dir, task_file, tmp_path / "out", device="cuda:1")),
          "device='cuda:1': no such GPU, this machine has 1 (cuda:0)")
    stops(lambda: serve.main(["--base", str(llama_dir), "--prompts", str(tmp_path), "--device", "cuda:1"]),
          "--device cuda:1: no such GPU, this machine has 1 (cuda:0)")
    stops(lambda: generate_cli.main(["--base", str(llama_dir), "--text", "x", "--device", "cuda:1"]),
          "--device cuda:1: no such GPU")
    assert list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line_and_status_1(llama_dir, tmp_path):
    bad = jsonl('{"input": "a", "target": " x"}', "{oops")(SimpleNamespace(tmp=tmp_path))
    run = subprocess.run([sys.executable, "train.py", *args(llama_dir, bad, tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (1, f"error: {bad}:2: not valid JSON (Expecting property name "
                                               "enclosed in double quotes)\n")
    assert not (tmp_path / "out").exists()


# ---- inputs longer than max_len: truncated from the left, one warning -----------------------

def test_long_inputs_are_truncated_with_one_warning(llama_dir, tmp_path, capsys):
    long = rows(20)(SimpleNamespace(tmp=tmp_path))
    long.write_text("".join(json.dumps({"input": "word " * 150 + str(i), "target": [" no", " yes"][i % 2]})
                            + "\n" for i in range(20)))
    train.main(args(llama_dir, long, tmp_path / "out", steps=2, eval_interval=0, max_len=64))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: inputs longer than max_len=64 tokens are truncated from the left"], err
    assert (tmp_path / "out" / "prompt.safetensors").exists()


# ---- failures during training: the step is named, the last checkpoint kept -----------------

def fail_training_forward(monkeypatch, at_call, fault):
    """From training forward number at_call on, fault(loss) replaces the loss (or raises)."""
    real_attach, calls = train.attach, []

    def attach(*a, **k):
        model = real_attach(*a, **k)
        forward = model.forward

        def patched(*fa, **fk):
            logits, loss = forward(*fa, **fk)
            if fk.get("loss_only"):
                calls.append(1)
                if len(calls) >= at_call:
                    loss = fault(loss)
            return logits, loss
        model.forward = patched
        return model
    monkeypatch.setattr(train, "attach", attach)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(llama_dir, task_file, tmp_path, monkeypatch):
    fail_training_forward(monkeypatch, 5, lambda loss: loss * float("nan"))
    out = tmp_path / "out"
    stops(lambda: train.main(args(llama_dir, task_file, out, steps=8, ckpt_interval=2, eval_interval=0)),
          "loss is nan at step 5", "stopped before the update",
          "checkpoint.pt (step 4) is the last good checkpoint")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_loss_stops_before_the_update(bad, llama_dir, task_file, tmp_path, monkeypatch):
    """The parameters after the refused step are those of the step before: counted as
    optimizer steps taken, and compared with the checkpoint written just before."""
    fail_training_forward(monkeypatch, 3, lambda loss: loss * 0 + bad)
    real_optimizer, steps_taken, trained = train.make_optimizer, [], []

    def counting_optimizer(cfg, params):
        optimizer = real_optimizer(cfg, params)
        trained.extend(params)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (steps_taken.append(1), step(*a, **k))[1]
        return optimizer
    monkeypatch.setattr(train, "make_optimizer", counting_optimizer)
    out = tmp_path / "out"
    stops(lambda: train.main(args(llama_dir, task_file, out, steps=6, ckpt_interval=2, eval_interval=0)),
          f"loss is {bad} at step 3", "stopped before the update")
    assert len(steps_taken) == 2
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["method"]
    assert [torch.equal(p.detach(), s) for p, s in zip(trained, saved.values())] == [True] * len(saved)


def test_nan_gradient_with_a_finite_loss_stops_before_the_update(llama_dir, task_file, tmp_path, monkeypatch):
    # the value is the loss; the gradient of sqrt at 0 is inf, times 0 a NaN
    fail_training_forward(monkeypatch, 3, lambda loss: loss + 0 * torch.sqrt(loss - loss))
    out = tmp_path / "out"
    stops(lambda: train.main(args(llama_dir, task_file, out, steps=6, ckpt_interval=2, eval_interval=0)),
          "gradient norm is nan at step 3", "stopped before the update",
          "checkpoint.pt (step 2) is the last good checkpoint")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 1e12 bytes")],
                         ids=["OutOfMemoryError", "cpu allocator"])
def test_out_of_memory_suggests_grad_accum(error, llama_dir, task_file, tmp_path, monkeypatch):
    def oom(loss):
        raise error
    fail_training_forward(monkeypatch, 1, oom)
    out = tmp_path / "out"
    stops(lambda: train.main(args(llama_dir, task_file, out, batch_size=4, eval_interval=0)),
          "out of memory at step 1 on micro-batches of 4 rows", "--batch_size=2 --grad_accum=2",
          "no checkpoint was written")
    assert not (out / "prompt.safetensors").exists()


@ranks_fit(2)
def test_torchrun_one_rank_failing_stops_all(llama_dir, task_file, tmp_path):
    """Rank 1 runs out of memory at its first step; rank 0 must not wait for it forever."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(f"""import os, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from types import SimpleNamespace
import torch, train
from test_bad_input import fail_training_forward
if os.environ["RANK"] == "1":
    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory")
    fail_training_forward(SimpleNamespace(setattr=setattr), 1, oom)
train.main(sys.argv[1:])
""")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args(llama_dir, task_file, tmp_path / "out", eval_interval=0)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    assert run.returncode != 0 and "error: out of memory at step 1" in run.stderr, run.stderr[-3000:]
    assert took < 60, f"the surviving rank took {took:.0f} s to stop"
    assert not (tmp_path / "out" / "prompt.safetensors").exists()


# ---- converter: GGUF and safetensors headers checked before anything is allocated --------------

GGML = {"F32": (0, 1, 4), "Q2_K": (10, 256, 84)}  # name: (type id, block, bytes per block)


def gguf_bytes(arch="llama", tensors=(("w", "F32", (8, 2)),), data=True, n_tensors=None):
    """A GGUF v3 file: general.architecture, a tensor table, 32-byte aligned data (data=False: none)."""
    def s(text):
        b = text.encode()
        return struct.pack("<Q", len(b)) + b
    table, blob = b"", b""
    for name, kind, dims in tensors:
        type_id, block, size = GGML[kind]
        table += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        table += struct.pack("<IQ", type_id, len(blob))
        if data:
            n = 1
            for d in dims:
                n *= d
            blob += b"\0" * (n // block * size)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, 1)
    head += s("general.architecture") + struct.pack("<I", 8) + s(arch) + table
    return head + b"\0" * (-len(head) % 32) + blob


def gguf(**kw):
    def make(tmp):
        (tmp / "model.gguf").write_bytes(gguf_bytes(**kw))
        return tmp / "model.gguf"
    return make


def truncated_smollm2(tmp):
    path = tmp / "SmolLM2.gguf"
    with open(fetch("smollm2-gguf"), "rb") as f:
        path.write_bytes(f.read(30_000_000))
    return path


def hf_dir_with(tensor_header):
    def make(tmp):
        d = tmp / "hf"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "intermediate_size": 8}))
        raw_safetensors(d / "model.safetensors", tensor_header)
        return d
    return make


def test_gguf_tokenizer_header_is_checked_before_reading(tmp_path):
    """load_tokenizer(.gguf) walks the header as the converter does, and names the bad entry."""
    from minipt.tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="header claims 1,000,000,000,000 tensors"):
        load_tokenizer(gguf(n_tensors=10**12)(tmp_path))


CONVERT_CASES = [
    ("truncated GGUF", truncated_smollm2, ["SmolLM2.gguf: tensor", "the data section has"]),
    ("GGUF claims a 1 TB tensor", gguf(tensors=[("w", "F32", (2**20, 2**18))], data=False),
     ["tensor 'w': F32[1048576, 262144] needs 1,099,511,627,776 bytes"]),
    ("GGUF claims 10^12 tensors", gguf(n_tensors=10**12), ["header claims 1,000,000,000,000 tensors"]),
    ("GGUF cut inside its header", lambda tmp: cut(gguf()(tmp), 100),
     ["model.gguf: tensor 'w' needs 4 bytes at offset 98, the file has 100"]),
    ("not a GGUF file", junk("m.gguf", b"PK\3\4" + bytes(64)), ["m.gguf: not a GGUF file"]),
    ("unsupported GGUF quant type", gguf(tensors=[("blk.0.ffn_up.weight", "Q2_K", (256, 4))]),
     ["tensor 'blk.0.ffn_up.weight': GGUF type Q2_K not supported", "Q4_K"]),
    ("unsupported GGUF architecture", gguf(arch="gpt2"),
     ["GGUF architecture 'gpt2' not supported (llama, qwen2, gemma3)"]),
    ("safetensors claims a 1 TB tensor",
     hf_dir_with({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2**18, 2**20],
                                                "data_offsets": [0, 2**40]}}),
     ["tensor 'model.embed_tokens.weight': F32[262144, 1048576] needs 1,099,511,627,776 bytes"]),
    ("safetensors shorter than its header",
     lambda tmp: cut(hf_dir_with({})(tmp) / "model.safetensors", 3).parent,
     ["model.safetensors: not a safetensors file"]),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses(make, words, tmp_path):
    src = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    stops(lambda: convert.main([str(src), str(tmp_path / "out")]), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary directory


def test_convert_refuses_a_malicious_pickle(tmp_path):
    """A pytorch_model.bin whose unpickling would run a command: refused, the command never runs."""
    d = hf_dir_with({})(tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    stops(lambda: convert.main([str(d), str(tmp_path / "out")]), "pytorch_model.bin: refused",
          "it would call", "system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_does_not_replace_out_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    stops(lambda: convert.main([str(gguf()(tmp_path)), str(tmp_path / "out")]), "out: already exists",
          "--force")
    assert (tmp_path / "out" / "keep").read_text() == "mine"


@pytest.mark.parametrize("method, extra, words", [
    ("lora", "--adapter_layers=3", "adapter_layers=3: lora does not use it"),
    ("prompt_tuning", "--lora_r=4", "lora_r=4: prompt_tuning does not use it"),
    ("prefix_tuning", "--init_labels= a, b", "init_labels=['a', 'b']: prefix_tuning does not use it"),
    ("p_tuning_v2", "--init=random", "init_text='x': it is read only with init=text"),
])
def test_train_refuses_a_field_the_method_does_not_read(method, extra, words, llama_dir, task_file, tmp_path):
    argv = args(llama_dir, task_file, tmp_path / "out", method=method) + [extra]
    if method == "p_tuning_v2":
        argv.append("--init_text=x")
    stops(lambda: train.main(argv), words)
    assert not (tmp_path / "out").exists()


# ---- the generated sweep: every train.py key, values of each bad kind ------------------------
# Each case must be refused with one line naming the key (or the path), exit status 1, nothing
# written, and before the base model loads (train.load_base fails the test if it is called).

def first_method_reading(key):
    """A method that reads `key` (with init=text, or labels for init_labels): a field the
    method does not read is refused as unused, which is another case."""
    if key not in {f.name for f in dataclasses.fields(PromptConfig)}:
        return "prompt_tuning"
    init = "labels" if key == "init_labels" else "text"
    return next(m for m in METHODS if key in fields_read(m, init))


def bad_values(key, typ):
    """(kind, text) pairs of values `key` must refuse, by the field's type."""
    typ = next(t for t in typing.get_args(typ) or [typ] if t is not type(None))   # int | None -> int
    if typ is bool:
        return [("not a boolean", "maybe")]
    if typ is int:
        return [("not a number", "many"), ("not an integer", "1.5"), ("out of range", "-1000000")]
    if typ is float:
        return [("not a number", "fast"), ("not finite", "nan"), ("infinite", "inf"), ("negative", "-1")]
    if typ is list:
        return {"init_labels": [("empty", "")], "t5_prefix_sites": [("unknown item", "nowhere")]}.get(
            key, [("empty", ""), ("unknown item", "nowhere")])
    cases = {"init_text": [("only spaces", "   ")], "template": [("no {input}", "Review:"),
                                                                  ("unknown field", "{question} {input}"),
                                                                  ("unbalanced brace", "{input")],
             "init_from": [], "base": [], "data": [], "out_dir": []}     # paths: see PATH_CASES
    return cases.get(key, [("empty", ""), ("unknown", "nonsense")])


SWEEP = [(key, kind, text) for key, typ in typing.get_type_hints(TrainConfig).items()
         for kind, text in bad_values(key, typ)]


def refused_early(argv, out, *words):
    line = stops(lambda: train.main(argv), *words)
    assert not out.exists(), f"{out} was created"
    return line


@pytest.mark.parametrize("key, kind, text", SWEEP, ids=[f"{k}-{kind}" for k, kind, _ in SWEEP])
def test_every_key_refuses_bad_values(key, kind, text, llama_dir, task_file, tmp_path, no_base_load):
    out = tmp_path / "out"
    settings = dict(method=first_method_reading(key), init="labels" if key == "init_labels" else "text",
                    init_text="a short review")
    if key == "init_text":
        settings.pop("init_text")
    argv = args(llama_dir, task_file, out, **settings) + [f"--{key}={text}"]
    line = refused_early(argv, out)
    assert f"{key}=" in line or f"{key}:" in line, line


def a_file(t):
    (t.tmp / "a_file").write_text("not a directory")
    return t.tmp / "a_file"


# key, how the path is bad, the value (built from the fixtures), words of the message
PATH_CASES = [
    ("base", "missing", lambda t: t.tmp / "nowhere", ["nowhere: no such checkpoint directory"]),
    ("base", "a file", a_file, ["a_file: a file, not a minipt checkpoint directory"]),
    ("base", "a GGUF file", lambda t: junk("m.gguf", b"GGUF")(t),
     ["m.gguf: a file", "python -m minipt.convert"]),
    ("base", "a directory of something else", lambda t: t.tmp, ["config.json: not found"]),
    ("data", "a directory without splits", lambda t: t.tmp, ["train.jsonl"]),
    ("data", "a binary file", junk("rows.jsonl", bytes(range(256))), ["rows.jsonl:1:"]),
    ("data", "a directory among the splits", lambda t: f"{t.llama},{t.llama},{t.llama}",
     ["a directory, not a JSONL"]),
    ("data", "unreadable", lambda t: "/proc/self/mem", ["/proc/self/mem: unreadable"]),   # EIO even for root
    ("out_dir", "a file", a_file, ["out_dir=", "a_file", "a file, not a directory"]),
    ("out_dir", "unwritable", lambda t: "/proc/minipt-out",
     ["out_dir='/proc/minipt-out': cannot create files in /proc"]),
    ("out_dir", "under a file", lambda t: a_file(t) / "out", ["out_dir=", "a_file is"]),
    ("init_from", "a directory", lambda t: t.tmp, ["init_from:", "not a readable safetensors file"]),
    ("init_from", "unreadable", lambda t: "/proc/self/mem",
     ["init_from:", "not a readable safetensors file"]),
    ("init_from", "a checkpoint's weights", lambda t: t.llama / "model.safetensors",
     ["init_from:", "not a minipt prompt file"]),
]


@pytest.mark.parametrize("key, value, words", [(c[0], c[2], c[3]) for c in PATH_CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in PATH_CASES])
def test_every_path_refuses_the_wrong_kind(key, value, words, llama_dir, task_file, tmp_path, no_base_load):
    t = SimpleNamespace(tmp=tmp_path, llama=llama_dir)
    out = tmp_path / "out"
    over = {key: value(t)}
    argv = args(over.pop("base", llama_dir), task_file, out, **over)
    before = sorted(p.name for p in tmp_path.iterdir())
    stops(lambda: train.main(argv), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- the other command lines: every option checked before the model loads ---------------------

def cli_cases():
    """(command, argv built from the fixtures, words of the message)."""
    base = lambda t: ["--base", str(t.llama)]
    gen = lambda *extra: ("generate", lambda t: base(t) + ["--text", "Hello"] + [e(t) if callable(e) else e
                                                                                  for e in extra])
    cases = [
        (gen("--top-p", "1.5"), ["top_p=1.5: must be in (0, 1]"]),
        (gen("--top-p", "0"), ["top_p=0.0"]),
        (gen("--temperature", "-1"), ["temperature=-1.0: must be a finite number >= 0"]),
        (gen("--temperature", "nan"), ["temperature=nan"]),
        (gen("--top-k", "0"), ["top_k=0: must be at least 1"]),
        (gen("--max-new-tokens", "0"), ["max_new_tokens=0: must be at least 1"]),
        (gen("--max-new-tokens", "many"), ["argument --max-new-tokens: invalid int value: 'many'"]),
        (gen("--lookup", "-1"), ["--lookup=-1"]),
        (gen("--text", "  "), ["--text='  ': empty"]),
        (gen("--labels", " , "), ["--labels=' , ': no labels"]),
        (gen("--dtype", "float8"), ["argument --dtype: invalid choice: 'float8'"]),
        (gen("--prompt", lambda t: str(t.tmp / "none.safetensors")),
         ["none.safetensors: no such prompt file"]),
        (gen("--prompt", lambda t: str(junk("p.safetensors", bytes(200))(t))),
         ["not a readable safetensors file"]),
        (gen("--prompt", lambda t: str(prompt_file(t, base_copy(other_weights)(t)))),
         ["trained on a different base model", "embedding hash"]),
        (gen("--packed", "--device", "cuda"), ["--packed is for CPU decoding"]),
        (gen("--device", "gpu"), ["--device gpu: not a device", "use --device cpu, cuda or cuda:N"]),
        (gen("--device", "meta"), ["--device meta: meta devices are not supported"]),
        (("generate", lambda t: ["--base", str(t.tmp / "nowhere"), "--text", "x"]),
         ["nowhere: no such checkpoint"]),
        (("generate", lambda t: ["--base", str(t.t5), "--text", "x", "--compile"]),
         ["--compile: decoder models only"]),
        (("generate", lambda t: ["--base", str(t.t5), "--text", "x", "--chat"]), ["no chat template"]),
        (("serve", lambda t: base(t) + ["--prompts", str(t.tmp), "--port", "70000"]), ["--port 70000"]),
        (("serve", lambda t: base(t) + ["--prompts", str(t.tmp), "--max-batch", "0"]), ["--max-batch 0"]),
        (("serve", lambda t: base(t) + ["--prompts", str(t.tmp), "--batch-window-ms", "nan"]),
         ["--batch-window-ms nan"]),
        (("serve", lambda t: base(t) + ["--prompts", str(t.tmp / "none")]),
         ["--prompts", "none: not a folder"]),
        (("serve", lambda t: ["--base", str(a_file(t)), "--prompts", str(t.tmp)]), ["a_file: a file"]),
        (("serve", lambda t: base(t) + ["--prompts", str(t.tmp), "--device", "cuda:x"]),
         ["--device cuda:x: not a device", "use --device cpu, cuda or cuda:N"]),
        (("evaluation", lambda t: base(t) + [str(t.tmp / "none.safetensors")]),
         ["none.safetensors: no such prompt"]),
        (("evaluation", lambda t: base(t) + ["--data", str(t.tmp / "none.jsonl"), "p"]),
         ["none.jsonl: no such file"]),
        (("evaluation", lambda t: base(t) + ["--template", "Review:", "p"]),
         ["template='Review:': no {input}"]),
        (("evaluation", lambda t: base(t) + ["--split", "dev", "p"]),
         ["argument --split: invalid choice: 'dev'"]),
        (("inspect", lambda t: [str(t.tmp / "none.safetensors")]), ["none.safetensors: no such prompt file"]),
        (("inspect", lambda t: ["p.safetensors", "--top", "-1"]), ["--top -1: must be at least 0"]),
        (("convert", lambda t: [str(t.tmp / "none.gguf"), str(t.tmp / "out")]), ["none.gguf"]),
        (("interop", lambda t: ["import", str(t.tmp / "none.npy"), str(t.tmp / "p.safetensors")] + base(t)),
         ["none.npy: no such file"]),
        (("interop", lambda t: ["import", str(npy(t, (3, 7))), str(t.tmp / "p.safetensors")] + base(t)),
         ["soft prompt of shape (3, 7)", "expected (num_virtual_tokens, 64)"]),
        (("interop", lambda t: ["import", str(t.tmp), str(t.tmp / "p.safetensors")] + base(t)),
         ["adapter_config.json"]),
        (("interop", lambda t: ["export", str(prompt_file(t, t.llama)), str(t.tmp / "peft"),
                                "--base", str(a_file(t))]),
         ["a_file: a file, not a minipt checkpoint directory"]),
    ]
    if not torch.cuda.is_available():
        cases += [(gen("--device", "cuda"), ["--device cuda: CUDA is not available", "use --device cpu"]),
                  (("serve", lambda t: base(t) + ["--prompts", str(t.tmp), "--device", "cuda"]),
                   ["--device cuda: CUDA is not available", "use --device cpu"])]
    return cases


CLI_CASES = cli_cases()


def npy(t, shape):
    import numpy as np
    np.save(t.tmp / "prompt.npy", np.zeros(shape, dtype=np.float32))
    return t.tmp / "prompt.npy"


def cli_main(command):
    import generate as generate_cli
    from minipt import evaluation, inspect, interop, serve
    return {"generate": generate_cli.main, "serve": serve.main, "evaluation": evaluation.main,
            "inspect": inspect.main, "convert": convert.main, "interop": interop.main}[command]


@pytest.mark.parametrize("case, words", CLI_CASES, ids=[f"{c[0]}-{i}-{' '.join(w)[:40]}"
                                                         for i, (c, w) in enumerate(CLI_CASES)])
def test_commands_refuse_bad_options_before_loading(case, words, llama_dir, t5_dir, tmp_path, monkeypatch):
    import minipt.checkpoint
    import minipt.serve

    def loaded(*a, **k):
        raise AssertionError("the model loaded before the refusal")
    for module in (minipt.checkpoint, minipt.serve, sys.modules.get("generate") or __import__("generate")):
        monkeypatch.setattr(module, "load_base", loaded, raising=False)
    command, make_argv = case
    t = SimpleNamespace(tmp=tmp_path, llama=llama_dir, t5=t5_dir)
    argv = make_argv(t)
    before = sorted(p.name for p in tmp_path.iterdir())
    stops(lambda: cli_main(command)(argv), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---- data that is odd but valid keeps working ------------------------------------------------

def write_rows(path, rows, newline="\n", bom=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + newline for r in rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


def test_a_bom_and_windows_line_ends_read_as_the_plain_file(task_file, tmp_path):
    from minipt.tasks import load_task
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    windows = write_rows(tmp_path / "windows.jsonl", rows, newline="\r\n", bom=True)
    assert load_task(str(windows)).splits == load_task(str(task_file)).splits


@pytest.mark.parametrize("kind", ["non-ASCII and emoji", "duplicated rows", "BOM and CRLF"])
def test_odd_but_valid_data_trains(kind, llama_dir, task_file, tmp_path, capsys):
    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    if kind == "non-ASCII and emoji":
        rows = [dict(r, input=f"Très bien 😀 — 日本語の映画 {r['input']} ✓") for r in rows]
    if kind == "duplicated rows":
        rows = rows[:20] * 3
    path = write_rows(tmp_path / "rows.jsonl", rows,
                      **(dict(newline="\r\n", bom=True) if kind == "BOM and CRLF" else {}))
    out = tmp_path / "out"
    train.main(args(llama_dir, path, out, steps=2, eval_interval=0))
    assert (out / "prompt.safetensors").exists() and "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("make, words", [
    (lambda t: t.tmp / "none.py", ["none.py: no such config file"]),
    (lambda t: t.tmp, ["a directory, not a config file"]),
    (junk("binary.py", b"steps = 3\n\xff\xfe"), ["binary.py: not UTF-8 text (byte 0xff at offset 10)"]),
    (junk("syntax.py", b"steps = 3\nlr = (\n"), ["syntax.py:2: not valid Python"]),
    (junk("code.py", b"import os\n"), ["code.py:1: only `key = value` lines are allowed"]),
], ids=["missing", "a directory", "not UTF-8", "syntax error", "code"])
def test_a_bad_config_file_is_refused(make, words, llama_dir, task_file, tmp_path, no_base_load):
    path = make(SimpleNamespace(tmp=tmp_path))
    out = tmp_path / "out"
    stops(lambda: train.main([str(path)] + args(llama_dir, task_file, out)), *words)
    assert not out.exists()
