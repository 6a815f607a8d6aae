"""A frozen base kept in its codes (minipt.quantized): every GGUF block layout unpacks to the
gguf package's own dequantization, bit for bit; the three real bases computed from their
codes give their fp32 checkpoints' logits exactly; every method trains through them with the
fp32 base's loss and gradients, the codes untouched; train.py --base_quant runs end to end
(its refusals: tests/test_bad_input.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minipt.checkpoint import load_base, load_model
from minipt.prompts import PromptConfig, attach, load
from minipt.quantized import (GGUF_UNPACK, QuantizedLinear, from_gguf_blocks, int8_per_channel,
                              weight_bytes)

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter", "lora"]


def random_blocks(kind, rows, cols, seed=0):
    """Random GGUF blocks of `kind` whose fp16 scale fields hold finite values."""
    size, per_block, _ = GGUF_UNPACK[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    offsets = {"Q6_K": [208], "Q4_1": [0, 2], "Q4_K": [0, 2]}.get(kind, [0])
    for off in offsets:
        scales = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        raw[..., off:off + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(GGUF_UNPACK))
def test_every_block_layout_dequantizes_as_the_gguf_package_does(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    raw = random_blocks(kind, 6, 512)
    expected = torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[kind]), dtype=np.float32))
    weight = from_gguf_blocks(raw, kind, (6, 512))
    assert torch.equal(weight.dense(), expected)
    assert torch.equal(weight.dense(torch.tensor([4, 1])), expected[[4, 1]])     # rows by id: the embedding
    assert torch.equal(weight.dense(slice(2, 5)), expected[2:5])
    bytes_per_weight = weight.nbytes() / expected.numel()
    assert bytes_per_weight <= {"Q4_1": 0.75, "Q4_K": 0.75}.get(kind, 1.25)      # 4-bit codes two a byte


def test_int8_per_channel_is_within_half_a_step():
    w = torch.randn(16, 64) * torch.logspace(-3, 1, 16)[:, None]                  # rows of very different sizes
    q = int8_per_channel(w)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dense() - w).abs() <= step / 2 + 1e-7).all()
    assert q.nbytes() < w.numel() * 1.1


def test_the_product_and_its_input_gradient_are_the_dense_ones(monkeypatch):
    """Row blocks smaller than the matrix (CHUNK patched) give nn.Linear's product and dx."""
    import minipt.quantized as quantized
    monkeypatch.setattr(quantized, "CHUNK", 3 * 64)                               # 3 rows at a time
    raw = random_blocks("Q4_K", 10, 256, seed=1)
    weight = from_gguf_blocks(raw, "Q4_K", (10, 256))
    layer = QuantizedLinear(weight, torch.nn.Parameter(torch.randn(10)))
    dense = torch.nn.Linear(256, 10)
    with torch.no_grad():
        dense.weight.copy_(weight.dense()), dense.bias.copy_(layer.bias)
    x = torch.randn(2, 3, 256, requires_grad=True)
    g = torch.randn(2, 3, 10)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, g)
    y_ref = dense(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    # fp32 sums in another order: equal to a millionth of the largest value
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6 * y_ref.abs().max().item())
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-6 * dx_ref.abs().max().item())
    assert not any(p.requires_grad for p in weight.buffers())


# ---- the real bases -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_dirs(smollm2_dir, qwen2_dir):
    from weights.gemma3 import main
    return {"smollm2": smollm2_dir, "gemma3": main(), "qwen2.5": qwen2_dir}


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2.5"])
@torch.no_grad()
def test_a_base_from_its_codes_computes_its_fp32_logits_exactly(real_dirs, name):
    """Q4_1 and Q8_0 (SmolLM2), Q4_K, Q5_0, Q6_K and Q8_0 (Gemma 3, Qwen2.5): the converter's fp32
    weights are the codes dequantized, so both models give the same bits."""
    directory = real_dirs[name]
    quantized, tok = load_base(directory, dtype=torch.float32, quant="gguf")
    dense = load_model(directory, dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    assert torch.equal(quantized(ids)[0], dense(ids)[0])
    held, fp32 = weight_bytes(quantized)
    assert held < 0.35 * fp32, (held, fp32)
    kinds = {m.qweight.kind for m in quantized.modules() if isinstance(m, QuantizedLinear)}
    assert kinds <= set(GGUF_UNPACK) and kinds


def smollm2_prompted(directory, method, quant):
    base, tok = load_base(directory, dtype=torch.float32, quant=quant)
    cfg = PromptConfig.for_method(method, num_virtual_tokens=4, init="vocab" if method != "lora" else "random",
                                  encoder_hidden=16, projection_hidden=16, adapter_layers=2, lora_r=2, seed=3)
    model = attach(base, cfg, tok)
    if method == "adapter":                                  # open the gates: closed, the base is alone
        with torch.no_grad():
            model.method.gates.fill_(0.5)
    return model, tok


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_the_codes_as_through_the_fp32_base(smollm2_dir, method):
    models = {q: smollm2_prompted(smollm2_dir, method, q) for q in ("none", "gguf")}
    tok = models["none"][1]
    ids = torch.tensor([tok.encode("Review: a gripping, tender film\nSentiment: positive")])
    targets = torch.full_like(ids, -100)
    targets[0, -1] = ids[0, -1]
    results = {}
    for q, (model, _) in models.items():
        codes = {n: b.clone() for n, b in model.base.named_buffers() if n.endswith(".codes")}
        _, loss = model(ids, targets)
        loss.backward()
        grads = {n: p.grad for n, p in model.method.named_parameters() if p.requires_grad}
        assert all(torch.equal(b, codes[n]) for n, b in model.base.named_buffers() if n.endswith(".codes"))
        results[q] = loss.item(), grads
    (loss_d, grads_d), (loss_q, grads_q) = results["none"], results["gguf"]
    assert loss_q == pytest.approx(loss_d, rel=1e-5)     # the dense head takes fast.LinearCrossEntropy
    assert grads_d.keys() == grads_q.keys() and grads_d
    for n, g in grads_d.items():   # the same up to fp32 order: within 1e-4 of each gradient's largest value
        torch.testing.assert_close(grads_q[n], g, rtol=0, atol=1e-4 * g.abs().max().item())


def test_train_py_through_the_codes_saves_a_prompt_for_the_dense_base(smollm2_dir, tmp_path):
    from minipt.tasks import load_task
    rows = load_task("sentiment").splits["train"][:40]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "train.py", f"--base={smollm2_dir}", f"--data={task}",
                          "--method=prompt_tuning", "--base_quant=gguf", "--dtype=float32", "--steps=2",
                          "--batch_size=2", "--eval_interval=0", "--eval_examples=2", "--ckpt_interval=0",
                          "--num_virtual_tokens=4", "--init=vocab", f"--out_dir={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "base_quant=gguf: the base's weights take" in run.stdout
    base, tok = load_base(smollm2_dir, dtype=torch.float32)
    load(out / "prompt.safetensors", base, tok)              # the fingerprint is the dense base's


# ---- a checkpoint without codes -------------------------------------------------------------

def test_int8_keeps_a_checkpoint_without_codes_within_its_rounding(llama_dir):
    dense = load_model(llama_dir, dtype=torch.float32)
    quantized = load_model(llama_dir, dtype=torch.float32, quant="int8")
    ids = torch.arange(3, 60, 5)[None]
    with torch.no_grad():
        a, b = quantized(ids)[0], dense(ids)[0]
    assert not torch.equal(a, b)                              # rounded, so not the same bits
    torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())
    held, fp32 = weight_bytes(quantized)
    assert held < 0.35 * fp32
