"""Prefix tuning and P-tuning v2 against peft (Llama with grouped-query attention, GPT-2;
with and without the MLP reparameterisation), T5's three prefix sites, cached generation,
left padding, gradient checkpointing, parameter counts and prompt files."""
import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model

from minipt.checkpoint import load_model
from minipt.prompts import PromptConfig, attach, load, save

from conftest import greedy_by_full_forwards, tiny_hf_model

P, H = 4, 24   # prefix length, MLP hidden width


@pytest.fixture(scope="module")
def converted(converted_dir):
    """kind -> a fresh minipt model of that tiny converted checkpoint."""
    return lambda kind, dtype=None: load_model(converted_dir(kind), dtype=dtype)


def config(**kw):
    kw.setdefault("method", "prefix_tuning")
    kw.setdefault("init", "random")     # peft's start: N(0, 1) (tests/test_init.py covers the others)
    return PromptConfig(num_virtual_tokens=P, projection_hidden=H, **kw)


def ids_batch(B=2, T=10, V=120, seed=0):
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- parity with peft ------------------------------------------------------------------

def share_with_peft(table, encoder):
    """Give peft's PrefixEncoder our values; return the (name, ours, peft's) parameter pairs.
    For grouped-query models peft's MLP input is kv-wide rather than d_model-wide, so ours
    gets zeros in the extra columns (of the embedding and of mlp_in), which makes the two
    MLPs compute the same function; `cut` compares the shared columns."""
    if not table.projection:
        pairs = [("table", table.table, encoder.embedding.weight)]
    else:
        w = encoder.embedding.weight.size(1)
        with torch.no_grad():
            table.embedding[:, w:] = 0
            table.mlp_in.weight[:, w:] = 0
        pairs = [("embedding", table.embedding, encoder.embedding.weight),
                 ("mlp_in.weight", table.mlp_in.weight, encoder.transform[0].weight),
                 ("mlp_in.bias", table.mlp_in.bias, encoder.transform[0].bias),
                 ("mlp_out.weight", table.mlp_out.weight, encoder.transform[2].weight),
                 ("mlp_out.bias", table.mlp_out.bias, encoder.transform[2].bias)]
    with torch.no_grad():
        for _, ours, theirs in pairs:
            theirs.copy_(cut(ours, theirs))
    return pairs


def cut(ours, theirs):
    return ours[:, :theirs.size(1)] if ours.dim() == 2 else ours


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_and_gradients_match_peft(kind, projection, converted):
    model = attach(converted(kind), config(prefix_projection=projection))
    peft = get_peft_model(tiny_hf_model(kind),  # seeded: the same weights that were converted
                          PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P,
                                             prefix_projection=projection, encoder_hidden_size=H))
    pairs = share_with_peft(model.method.sites["self"], peft.prompt_encoder["default"])
    ids = ids_batch()
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    ref = peft(input_ids=ids, labels=ids)  # the prefix is no token: logits and labels cover the text only
    assert (logits - ref.logits[:, :-1]).abs().max() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    loss.backward()
    ref.loss.backward()
    for name, ours, theirs in pairs:
        assert theirs.grad.abs().max() > 0, name
        assert torch.allclose(cut(ours.grad, theirs), theirs.grad, atol=1e-6, rtol=1e-4), name


# ---- T5: three sites -------------------------------------------------------------------

def t5_batch():
    ids = ids_batch(2, 8, V=100, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = ids_batch(2, 5, V=100, seed=2)
    dec[:, 0] = 0
    return ids, mask, dec


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@torch.no_grad()
def test_t5_each_site_changes_the_output_and_none_changes_nothing(variant, converted):
    base = converted("t5-" + variant)
    ids, mask, dec = t5_batch()
    ref, _ = base(ids, dec, attention_mask=mask)
    off = attach(base, config(t5_prefix_sites=[]))
    assert off.num_trainable() == 0 and off.method.prefixes(2) == {}
    assert torch.equal(off(ids, decoder_input_ids=dec, attention_mask=mask)[0], ref)
    for site in ["encoder", "decoder", "cross"]:
        model = attach(base, config(t5_prefix_sites=[site]))
        prefixes = model.method.prefixes(2)
        assert list(prefixes) == [site] and len(prefixes[site]) == 2
        assert prefixes[site][0].k.shape == (2, 4, P, 8)
        logits, _ = model(ids, decoder_input_ids=dec, attention_mask=mask)
        assert (logits - ref).abs().max() > 1e-3, site
    with pytest.raises(ValueError, match="t5_prefix_sites"):
        attach(base, config(t5_prefix_sites=["decoder", "lm_head"]))


# ---- generation through the KV cache ---------------------------------------------------

@pytest.mark.parametrize("kind,method", [("llama", "prefix_tuning"), ("gpt2", "p_tuning_v2"),
                                         ("t5-v1.0", "prefix_tuning"), ("t5-v1.1", "p_tuning_v2")])
@torch.no_grad()
def test_cached_generation_equals_full_forwards(kind, method, converted):
    model = attach(converted(kind), config(method=method))
    for prompts in ([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[21, 22, 23, 24]]):  # padded, then unpadded
        cached = model.generate(prompts, 6)
        assert cached == [greedy_by_full_forwards(model, p, 6) for p in prompts]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_left_padded_rows_match_rows_alone(kind, converted):
    model = attach(converted(kind), config())
    ids = ids_batch(3, 9, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    batch, _ = model(ids, attention_mask=mask)
    for b, start in enumerate([0, 4, 7]):
        alone, _ = model(ids[b:b + 1, start:])
        assert (batch[b, start:] - alone[0]).abs().max() <= 1e-5


# ---- training ---------------------------------------------------------------------------

def loss_of(model, kind):
    if kind.startswith("t5"):
        ids, mask, dec = t5_batch()
        return model(ids, targets=dec, attention_mask=mask)[1]
    ids = ids_batch(4, 12)
    return model(ids[:, :-1], ids[:, 1:])[1]


@pytest.mark.parametrize("kind", ["llama", "t5-v1.1"])
def test_trains_with_gradient_checkpointing(kind, converted):
    base = converted(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach(base, config())
    model.train()
    params = dict(model.method.named_parameters())
    grads = []
    for ckpt in (False, True):
        base.grad_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        loss_of(model, kind).backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    for k in params:
        assert grads[1][k].abs().max() > 0, k
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k
    assert all(p.grad is None for p in base.parameters())

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(model, kind)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in params.values()}
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_base_with_fp32_prefix(converted):
    model = attach(converted("llama", dtype=torch.bfloat16), config())
    loss = loss_of(model, "llama")
    loss.backward()
    for name, p in model.method.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().max() > 0, name


# ---- counts and files -------------------------------------------------------------------

@pytest.mark.parametrize("kind,method,sites", [("llama", "prefix_tuning", None),
                                               ("gpt2", "p_tuning_v2", None),
                                               ("t5-v1.0", "prefix_tuning", ["encoder", "cross"]),
                                               ("t5-v1.1", "p_tuning_v2", ["decoder"])])
def test_counts_and_save_load_round_trip(kind, method, sites, converted, tmp_path):
    base = converted(kind)
    kw = {} if sites is None else dict(t5_prefix_sites=sites)
    model = attach(base, config(method=method, **kw))
    n = model.num_trainable()
    assert model.method.closed_form_parameters() == n
    assert model.method.projection == (method == "prefix_tuning")
    # by hand: (kv heads x head_dim, d_model); every model here has 2 layers (per stack)
    kv, C = {"llama": (2 * 16, 64), "gpt2": (4 * 16, 64)}.get(kind, (4 * 8, 32))
    width = 2 * 2 * kv
    per_site = P * C + C * H + H + H * width + width if method == "prefix_tuning" else P * width
    assert n == per_site * (len(sites) if sites else 1)
    print(f"{kind} {method}: {model.method.describe_count()} = {n:,}")

    with torch.no_grad():  # move away from the seeded initial values, which a fresh attach would reproduce
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    saved = model.method.state_for_saving()
    if method == "prefix_tuning":  # the reparameterisation itself, so training can resume
        assert any("mlp_in" in k for k in saved) and any("embedding" in k for k in saved)
    save(model, tmp_path / "prefix.safetensors")
    loaded = load(tmp_path / "prefix.safetensors", converted(kind))
    for k, v in model.method.state_dict().items():
        assert torch.equal(loaded.method.state_dict()[k], v), k
    with torch.no_grad():
        if kind.startswith("t5"):
            ids, mask, dec = t5_batch()
            a, _ = model(ids, decoder_input_ids=dec, attention_mask=mask)
            b, _ = loaded(ids, decoder_input_ids=dec, attention_mask=mask)
        else:
            a, _ = model(ids_batch())
            b, _ = loaded(ids_batch())
    assert torch.equal(a, b)
