"""LLaMA-Adapter: a zero gate leaves the base model's output bit for bit, open gates change
it, gradients reach gates then prompts (also from a bf16 base), cached generation, counts
and prompt files, on Llama (grouped-query), GPT-2 and both T5 variants."""
import pytest
import torch
import torch.nn.functional as F

from minipt.checkpoint import load_model
from minipt.prompts import PromptConfig, attach, load, save

from conftest import greedy_by_full_forwards

P = 3
KINDS = ["llama", "gpt2", "t5-v1.0", "t5-v1.1"]


@pytest.fixture(scope="module")
def converted(converted_dir):
    """kind -> a fresh minipt model of that tiny converted checkpoint."""
    return lambda kind, dtype=None: load_model(converted_dir(kind), dtype=dtype)


def config(layers=1):
    return PromptConfig(method="adapter", num_virtual_tokens=P, adapter_layers=layers)


def inputs(kind):
    """A small batch with padding (left for the decoder, right for T5)."""
    g = torch.Generator().manual_seed(0)
    if kind.startswith("t5"):
        ids = torch.randint(2, 100, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        dec = torch.randint(2, 100, (2, 5), generator=g)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    ids = torch.randint(0, 120, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return dict(idx=ids, attention_mask=mask)


def run(model, kind):
    """Logits of the prompted model (T5 takes decoder_input_ids by keyword)."""
    x = inputs(kind)
    if kind.startswith("t5"):
        return model(x["input_ids"], decoder_input_ids=x["decoder_input_ids"],
                     attention_mask=x["attention_mask"])[0]
    return model(x["idx"], attention_mask=x["attention_mask"])[0]


def loss_of(model, kind):
    x = inputs(kind)
    if kind.startswith("t5"):
        return model(x["input_ids"], targets=x["decoder_input_ids"], attention_mask=x["attention_mask"])[1]
    ids = x["idx"]
    return model(ids[:, :-1], ids[:, 1:], attention_mask=x["attention_mask"][:, :-1])[1]


def open_gates(model, value=1.0):
    with torch.no_grad():
        model.method.gates.fill_(value)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_zero_gate_is_the_base_model_exactly_and_open_gates_are_not(kind, converted):
    base = converted(kind)
    x = inputs(kind)
    if kind.startswith("t5"):
        ref, _ = base(x["input_ids"], x["decoder_input_ids"], attention_mask=x["attention_mask"])
    else:
        ref, _ = base(x["idx"], attention_mask=x["attention_mask"])
    model = attach(base, config(layers=2))
    site = model.method.prefixes(2)["decoder" if kind.startswith("t5") else "self"]
    assert all(p is not None and p.gate is not None for p in site)
    assert torch.equal(run(model, kind), ref)
    open_gates(model)
    assert (run(model, kind) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "t5-v1.1"])
def test_top_layers_only(kind, converted):
    model = attach(converted(kind), config(layers=1))
    site = model.method.prefixes(3)["decoder" if kind.startswith("t5") else "self"]
    assert site[0] is None and site[1].gate.shape == (4,)
    n_kv = 2 if kind == "llama" else 4
    assert site[1].k.shape == (3, n_kv, P, 16 if kind == "llama" else 8)
    # the top layer's own frozen projections, no rotation
    attn = (model.base.decoder.layers if kind.startswith("t5") else model.base.layers)[1].attn
    with torch.no_grad():
        heads = lambda y: y.view(P, n_kv, -1).transpose(0, 1)
        assert torch.equal(site[1].k[2], heads(F.linear(model.method.prompts[0], attn.k_proj.weight)))
        assert torch.equal(site[1].v[2], heads(F.linear(model.method.prompts[0], attn.v_proj.weight)))
    with pytest.raises(ValueError, match="adapter_layers"):
        attach(converted(kind), config(layers=3))


@pytest.mark.parametrize("kind", ["llama", "t5-v1.0"])
def test_gradient_reaches_gate_at_init_then_prompt(kind, converted):
    base = converted(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach(base, config(layers=2))
    model.train()
    prompts, gates = model.method.prompts, model.method.gates
    loss_of(model, kind).backward()
    assert (gates.grad.abs() > 0).all()        # every head of every adapted layer
    assert torch.equal(prompts.grad, torch.zeros_like(prompts))  # tanh(0) = 0 blocks it exactly
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    opt.step()
    opt.zero_grad()
    loss_of(model, kind).backward()
    assert (prompts.grad.abs().amax(dim=(1, 2)) > 0).all()
    assert all(p.grad is None for p in base.parameters())
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # gradient checkpointing gives the same gradients
    grads = {n: p.grad.clone() for n, p in model.method.named_parameters()}
    base.grad_checkpointing = True
    model.zero_grad(set_to_none=True)
    loss_of(model, kind).backward()
    for n, p in model.method.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-5), n


def test_bf16_base_with_fp32_adapter(converted):
    model = attach(converted("llama", dtype=torch.bfloat16), config(layers=2))
    open_gates(model, 0.5)
    assert model.method.prompts.dtype == torch.float32
    loss = loss_of(model, "llama")
    loss.backward()
    for p in (model.method.prompts, model.method.gates):
        assert p.grad.dtype == torch.float32 and p.grad.abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_cached_generation_equals_full_forwards(kind, converted):
    model = attach(converted(kind), config(layers=2))
    open_gates(model)
    for prompts in ([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[21, 22, 23, 24]]):  # padded, then unpadded
        for prompt, out in zip(prompts, model.generate(prompts, 6)):
            assert out == greedy_by_full_forwards(model, prompt, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_counts_and_save_load_round_trip(kind, converted, tmp_path):
    model = attach(converted(kind), config(layers=2))
    n = model.num_trainable()
    d_model = 32 if kind.startswith("t5") else 64
    assert n == model.method.closed_form_parameters() == 2 * (P * d_model + 4)
    print(f"{kind} adapter: {model.method.describe_count()} = {n:,}")
    assert set(model.method.state_for_saving()) == {"prompts", "gates"}  # nothing of the base

    with torch.no_grad():  # away from the seeded initial values, which a fresh attach would reproduce
        model.method.prompts.add_(torch.randn_like(model.method.prompts))
        model.method.gates.uniform_(-1, 1)
    save(model, tmp_path / "adapter.safetensors")
    loaded = load(tmp_path / "adapter.safetensors", converted(kind))
    assert torch.equal(loaded.method.prompts, model.method.prompts)
    assert torch.equal(loaded.method.gates, model.method.gates)
    with torch.no_grad():
        assert torch.equal(run(loaded, kind), run(model, kind))
