"""The speed work (`minipt/fast.py`) against the plain code it replaces: training steps with
the switch on and off give the same loss and the same gradients, for every method that
trains through the model's norms, MLPs and attention, on padded batches (the unpadding and
the soft prompt run once per batch are on the fast side; a loss on every token, so the LM
head's chunked loss too), and generation the same tokens."""
import pytest
import torch

from minipt import fast
from minipt.checkpoint import load_model
from minipt.generation import generate
from minipt.prompts import PromptConfig, attach

METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter", "lora", "full"]


def padded_batch(vocab=120, B=3, T=9):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0                                          # left padding, two lengths
    mask[2, :5] = 0
    targets = torch.where(mask.bool(), torch.randint(3, vocab, (B, T), generator=g), -100)
    return idx, mask, targets


def step(model, batch, dtype):
    idx, mask, targets = batch
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, attention_mask=mask, loss_only=True)      # as train.py
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# full fine-tuning trains fp32 weights (train.py loads the base so), the others a bf16 base too
CASES = [(m, d) for m in METHODS for d in (torch.float32, torch.bfloat16)
         if not (m == "full" and d != torch.float32)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method, dtype", CASES, ids=[f"{m}-{str(d)[6:]}" for m, d in CASES])
def test_a_training_step_is_the_same_with_the_switch_off(method, dtype, kind, converted_dir, monkeypatch):
    monkeypatch.setattr(fast, "LOGITS_PER_CHUNK", 1000)      # the LM head's loss in chunks of a few rows
    monkeypatch.setattr(fast, "QUERY_BLOCK", 4)              # attention in blocks of queries
    config = PromptConfig.for_method(method, num_virtual_tokens=4, init="random", encoder_hidden=16,
                                     projection_hidden=16, adapter_layers=1, lora_r=2)
    model = attach(load_model(converted_dir(kind), dtype=dtype), config).train()
    if method == "adapter":
        with torch.no_grad():
            model.method.gates.fill_(0.5)                    # open: a zero gate would hide the adapter's path
    for p in model.trainable_parameters():
        p.data = p.data.float()
    batch = padded_batch()
    loss, grads = step(model, batch, dtype)
    with fast.off():
        plain_loss, plain_grads = step(model, batch, dtype)
    assert grads.keys() == plain_grads.keys() and grads
    if dtype == torch.float32:
        assert torch.allclose(loss, plain_loss, atol=1e-5, rtol=1e-4), (loss, plain_loss)
        for name in grads:
            assert torch.allclose(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4), name
        return
    # bf16 rounds differently on the two paths: compare against the gradient's own size
    assert torch.allclose(loss, plain_loss, rtol=1e-2), (loss, plain_loss)
    for name in grads:
        g, plain = grads[name].float(), plain_grads[name].float()
        assert (g - plain).norm() <= 0.03 * plain.norm(), (name, ((g - plain).norm() / plain.norm()).item())


@pytest.mark.parametrize("kind", ["llama", "t5-v1.1"])
def test_generation_gives_the_same_tokens_with_the_switch_off(kind, converted_dir):
    model = attach(load_model(converted_dir(kind)), PromptConfig(num_virtual_tokens=4, init="random"))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    tokens = generate(model, prompts, 12)
    with fast.off():
        assert generate(model, prompts, 12) == tokens


def test_the_switch_really_switches(converted_dir, monkeypatch):
    """Off, none of the fast functions runs: the plain path is what is compared above."""
    calls = []
    fast_functions = {"RMSNormFunction", "SiluMulFunction", "TakeRows", "ExplicitAttention", "LowRankUpdate",
                      "LinearCrossEntropy"}
    for name in fast_functions:
        real = getattr(fast, name).apply
        monkeypatch.setattr(getattr(fast, name), "apply",
                            lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    for config in (PromptConfig(num_virtual_tokens=4, init="random"), PromptConfig(method="lora", lora_r=2)):
        model = attach(load_model(converted_dir("llama")), config).train()
        before = len(calls)
        with fast.off():
            step(model, padded_batch(), torch.float32)
        assert calls[before:] == []
        step(model, padded_batch(), torch.float32)
    assert set(calls) == fast_functions
