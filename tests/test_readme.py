"""The README's Python examples run as written (the T5 one on a tiny random T5 standing in
for the t5-small checkpoint a user would convert)."""
import os
import re
from pathlib import Path

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
