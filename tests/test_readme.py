"""The README's Python examples run as written (the T5 one on a tiny random T5 standing in
for the t5-small checkpoint a user would convert)."""
import json
import os
import re
from pathlib import Path

import pytest

from minipt.convert import convert

from conftest import save_tiny_hf

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def example(marker):
    (block,) = [b for b in python_blocks() if marker in b]
    return block


def test_smollm2_example(smollm2_dir, tmp_path, monkeypatch):
    code = example("sentiment.safetensors").replace("weights/smollm2-135m-instruct", str(smollm2_dir))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    size = os.path.getsize(tmp_path / "sentiment.safetensors")
    assert 20 * 576 * 4 <= size < 60_000


def test_t5_example(tmp_path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    save_tiny_hf(transformers.T5ForConditionalGeneration(cfg).eval(), tmp_path / "hf")  # real vocabulary size
    convert(tmp_path / "hf", tmp_path / "t5-small")
    code = example('load_base("weights/t5-small")').replace("weights/t5-small", str(tmp_path / "t5-small"))
    exec(compile(code, "README.md", "exec"), {})


def test_adding_a_method_example(converted_dir, monkeypatch):
    """The README's new method, registered from a script, trains through the shared wrapper."""
    import torch
    from minipt.checkpoint import load_model
    from minipt.prompts import PromptConfig, attach, base
    scope = {}
    exec(compile(example("class MeanPrompt"), "README.md", "exec"), scope)
    monkeypatch.setitem(base.REGISTRY, "mean_prompt", scope["MeanPrompt"])
    with pytest.raises(ValueError, match="lora_r=4: mean_prompt does not use it"):
        PromptConfig(method="mean_prompt", lora_r=4)
    model = attach(load_model(converted_dir("llama")),
                   PromptConfig(method="mean_prompt", num_virtual_tokens=3))
    assert model.extra_positions == 3 and model.num_trainable() == model.method.closed_form_parameters()
    ids = torch.tensor([[5, 6, 7, 8]])
    _, loss = model(ids, ids)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["method.prompt"]


# --------------------------------------------------------------------------- the shell commands

def shell_commands():
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


# What the suite runs elsewhere instead of here: CI's own command, and what needs a second process group.
RUN_ELSEWHERE = {
    "make run": "the Makefile's run target is train.py config/sentiment.py and generate.py, run below",
    "make test": "CI's command (.ci/run)",
    "--shard=fsdp": "tests/test_fsdp.py, two sharded ranks against one process",
    ".venv/bin/torchrun": "tests/test_train.py::test_ddp_two_processes_equal_one",
    "minipt.convert SRC OUT": "placeholders; convert runs on a real HF directory below",
    ".venv/bin/lm_eval": "tests/test_lm_eval.py::test_the_readme_lm_eval_command, against a server",
}
# Budget cuts appended to train.py commands: the commands run as written, only shorter.
SHORT_RUN = ["--eval_interval=0", "--ckpt_interval=1", "--eval_examples=8"]


def test_every_shell_command_runs(tmp_path, monkeypatch):
    """Each command runs, in order, in a fresh directory laid out like the repository, with a
    tiny random Llama (SmolLM2's real tokenizer) standing in for weights/smollm2-135m-instruct
    and train.py's budget cut; the server answers one request; the others exit 0."""
    import shlex
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import tiny_hf_model
    root = Path(__file__).resolve().parent.parent
    save_tiny_hf(tiny_hf_model("llama", vocab_size=49152), tmp_path / "hf")
    base = tmp_path / "weights" / "smollm2-135m-instruct"
    convert(tmp_path / "hf", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_seq_len": 2048}))  # RoPE: any context
    (tmp_path / "config").symlink_to(root / "config")
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")

    def run(argv, **kw):
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, **kw)

    ran = []
    for command in shell_commands():
        if any(key in command for key in RUN_ELSEWHERE):
            continue
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/python", command
        argv[0] = sys.executable
        if argv[1].endswith(".py"):
            argv[1] = str(root / argv[1])
        if argv[1].endswith("train.py") and "--help" not in argv:
            argv += SHORT_RUN + ["--steps=3" if "--resume" in argv else "--steps=2"]
        if "minipt.evaluation" in argv or "--init_from=out/sentiment/prompt.safetensors" in argv:
            for name in ("seed0", "seed1"):
                shutil.copy(tmp_path / "out/sentiment/prompt.safetensors", tmp_path / f"{name}.safetensors")
        if argv[1].endswith("examples/agent.py"):  # after the server's command: out/prompts is there
            prompts = tmp_path / "out/prompts"
            shutil.copy(prompts / "sentiment.safetensors", prompts / "style.safetensors")
        if "minipt.serve" in argv:
            (tmp_path / "out/prompts").mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "out/sentiment/prompt.safetensors",
                        tmp_path / "out/prompts/sentiment.safetensors")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            argv[argv.index("--port") + 1] = str(port)
            server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 120
                while True:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                            models = {m["id"] for m in json.loads(r.read())["data"]}
                        break
                    except OSError:
                        assert server.poll() is None and time.time() < deadline, server.stdout.read().decode()
                        time.sleep(0.5)
            finally:
                server.terminate()
                server.wait(30)
            assert {"base", "sentiment"} <= models
        else:
            done = run(argv)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command)
    scripts = {c.split()[1] if c.split()[1] != "-m" else c.split()[2] for c in ran}
    assert scripts == {"train.py", "generate.py", "minipt.serve", "minipt.evaluation", "minipt.inspect",
                       "minipt.interop", "examples/agent.py"}, scripts
    assert (tmp_path / "out/peft-sentiment/adapter_config.json").exists()

    # the PromptBank example, on the prompts trained above
    shutil.copytree(tmp_path / "out/sentiment", tmp_path / "out/style")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example("PromptBank(base)"), "README.md", "exec"), scope)
    assert len(scope["outputs"]) == 3

    # convert, on a real HF directory
    done = run([sys.executable, "-m", "minipt.convert", str(tmp_path / "hf"), str(tmp_path / "converted")])
    assert done.returncode == 0 and (tmp_path / "converted/model.safetensors").exists(), done.stderr
