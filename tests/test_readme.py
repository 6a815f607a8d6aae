"""The README's Python examples run as written (the T5 one on a tiny random T5 standing in
for the t5-small checkpoint a user would convert)."""
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
    model = attach(load_model(converted_dir("llama")), PromptConfig(method="mean_prompt", num_virtual_tokens=3))
    assert model.extra_positions == 3 and model.num_trainable() == model.method.closed_form_parameters()
    ids = torch.tensor([[5, 6, 7, 8]])
    _, loss = model(ids, ids)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["method.prompt"]
