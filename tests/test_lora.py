"""LoRA against peft on a tiny Llama (logits and gradients); on T5: a zero B leaves the base
output exact, merging, prompt files holding only A/B, a frozen base; and the full
fine-tuning baseline."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from minipt.checkpoint import load_model
from minipt.config import GPTConfig
from minipt.gpt import GPT
from minipt.prompts import PromptConfig, attach, load, save
from minipt.prompts.lora import LoRALinear

from conftest import tiny_hf_model

R, ALPHA = 4, 8.0


def lora(**kw):
    return PromptConfig(method="lora", lora_r=R, lora_alpha=ALPHA, **kw)


def randomise_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for B in model.method.lora_B.values():
            B.copy_(torch.randn(B.shape, generator=g) * 0.2)


def t5_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 100, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask, torch.randint(2, 100, (2, 6), generator=g)


def test_logits_and_gradients_match_peft(llama_dir):
    model = attach(load_model(llama_dir), lora())
    randomise_B(model)  # else A gets no gradient and B's alignment goes untested
    peft = get_peft_model(tiny_hf_model("llama"),
                          LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                     lora_dropout=0.0))
    pairs = []
    for path, ours in model.method.wrappers.items():  # "layers.0.attn.q_proj"
        _, i, _, name = path.split(".")
        theirs = getattr(peft.base_model.model.model.layers[int(i)].self_attn, name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
        pairs += [(ours.lora_A, theirs.lora_A["default"].weight),
                  (ours.lora_B, theirs.lora_B["default"].weight)]
    assert len(pairs) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # GQA: v_proj maps 64 -> 32
    assert (model.num_trainable() == model.method.closed_form_parameters()
            == 2 * (R * (64 + 64) + R * (64 + 32)))
    assert model.num_trainable() == sum(p.numel() for p in peft.parameters() if p.requires_grad)

    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    ref = peft(input_ids=ids, labels=ids)  # peft shifts the labels itself
    assert (logits - ref.logits[:, :-1]).abs().max() <= 1e-4
    loss.backward()
    ref.loss.backward()
    for ours, theirs in pairs:
        assert ours.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_bf16_base_keeps_no_fp32_copy_of_the_input():
    """On a bf16 base the update runs in fp32, as peft's does: outputs and gradients (x, A, B)
    equal autograd through the plain formula, but backward keeps x in bf16, not its fp32 copy."""
    from minipt.layers import Linear
    g = torch.Generator().manual_seed(5)
    wrapper = LoRALinear(Linear(24, 16).to(torch.bfloat16).requires_grad_(False), R, ALPHA, 0.0, generator=g)
    with torch.no_grad():
        wrapper.lora_B.copy_(torch.randn(wrapper.lora_B.shape, generator=g))
    x = torch.randn(3, 7, 24, generator=g).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(3, 7, 16, generator=g).to(torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = wrapper(x)
    grads = torch.autograd.grad(out, [x, wrapper.lora_A, wrapper.lora_B], upstream)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)

    xr, A, B = (t.detach().clone().requires_grad_() for t in (x, wrapper.lora_A, wrapper.lora_B))
    ref = wrapper.base(xr) + (xr.float() @ A.t() @ B.t() * wrapper.scale).to(torch.bfloat16)
    ref_grads = torch.autograd.grad(ref, [xr, A, B], upstream)
    assert torch.equal(out, ref)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_zero_B_start_merge_and_detach(t5_dir):
    base = load_model(t5_dir)
    ids, mask, dec = t5_batch()
    before, _ = base(ids, decoder_input_ids=dec, attention_mask=mask)
    keys = list(base.state_dict())
    model = attach(base, lora(lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"]))
    # B = 0: exactly the base
    assert torch.equal(model(ids, decoder_input_ids=dec, attention_mask=mask)[0], before)

    randomise_B(model)
    unmerged, _ = model(ids, decoder_input_ids=dec, attention_mask=mask)
    assert (unmerged - before).abs().max() > 1e-3
    model.method.merge()
    assert (model(ids, decoder_input_ids=dec, attention_mask=mask)[0] - unmerged).abs().max() <= 1e-5
    model.method.detach(base)  # a plain model again, with the merged weights and its own keys
    assert list(base.state_dict()) == keys
    assert (base(ids, decoder_input_ids=dec, attention_mask=mask)[0] - unmerged).abs().max() <= 1e-5
    model.method.unmerge()
    assert (base(ids, decoder_input_ids=dec, attention_mask=mask)[0] - before).abs().max() <= 1e-5


def test_prompt_file_holds_only_lora_and_round_trips(t5_dir, tmp_path):
    base = load_model(t5_dir)
    base_keys = set(base.state_dict())
    model = attach(base, lora())
    randomise_B(model)
    ids, mask, dec = t5_batch()
    with torch.no_grad():
        expected, _ = model(ids, decoder_input_ids=dec, attention_mask=mask)
    path = save(model, tmp_path / "lora.safetensors")
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
    # 2 encoder self-attn + 2 decoder self-attn + 2 cross-attn, each q and v, each A and B
    assert len(names) == 6 * 2 * 2
    assert all(k.endswith((".lora_A", ".lora_B")) and k.rsplit(".", 1)[0] + ".weight" in base_keys
               for k in names)

    loaded = load(path, load_model(t5_dir))
    with torch.no_grad():
        assert torch.equal(loaded(ids, decoder_input_ids=dec, attention_mask=mask)[0], expected)
    with pytest.raises(ValueError, match="already has LoRA"):
        attach(base, lora())


def test_training_reaches_only_A_and_B(t5_dir):
    base = load_model(t5_dir)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach(base, lora(lora_dropout=0.1))
    lora_params = {id(p) for p in model.method.parameters()}
    assert {id(p) for p in model.trainable_parameters()} == lora_params
    # q, v: 32 -> 32 in 6 attention layers
    assert model.num_trainable() == model.method.closed_form_parameters() == 6 * 2 * R * (32 + 32)
    print(f"lora: {model.method.describe_count()} = {model.num_trainable():,}")
    A0 = {k: v.clone() for k, v in model.method.state_for_saving().items()}

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids, mask, dec = t5_batch()
    model.train()
    for _ in range(3):
        _, loss = model(ids, targets=dec, attention_mask=mask)
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if id(p) not in lora_params)
        opt.step()
        opt.zero_grad()
    after = model.method.state_for_saving()
    assert all(not torch.equal(after[k], A0[k]) for k in A0)  # every A and B moved
    model.method.detach(base)
    now = base.state_dict()
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], frozen[k]) for k in frozen)


def test_wrapper_targets_and_refusals(llama_dir):
    base = load_model(llama_dir)
    model = attach(base, lora(lora_targets=["gate_proj", "up_proj", "down_proj"]))
    wrapped = [m for m in base.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 3 and not any(isinstance(m.base, LoRALinear) for m in wrapped)
    assert model.num_trainable() == model.method.closed_form_parameters() == 2 * 3 * R * (64 + 96)
    for w in wrapped:  # peft's init: A Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(in)); B zero
        bound = w.base.in_features ** -0.5
        assert w.lora_A.abs().max() <= bound and w.lora_A.std() > 0.8 * bound / 3 ** 0.5
        assert not w.lora_B.any()
    with pytest.raises(ValueError, match="no linear layer named qkv"):
        attach(load_model(llama_dir), lora(lora_targets=["qkv"]))


# ---- full fine-tuning ------------------------------------------------------------------

def tiny_tied_gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=120, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, head_dim=8,
                    intermediate_size=64, max_seq_len=64, tie_embeddings=True)
    return GPT(cfg).eval()


def test_full_fine_tuning_trains_everything_and_round_trips(tmp_path):
    base = tiny_tied_gpt()
    model = attach(base, PromptConfig(method="full"))
    assert all(p.requires_grad for p in base.parameters())
    # the tied head counted once: embedding 120 x 32 + positions 64 x 32 + blocks + final norm
    block = 2 * 32 + 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32)
    n = 120 * 32 + 64 * 32 + 2 * block + 2 * 32
    assert model.num_trainable() == model.method.closed_form_parameters() == n

    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    after = base.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before)

    with torch.no_grad():
        expected, _ = model(ids)
    path = save(model, tmp_path / "full.safetensors")
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(after) - {"lm_head.weight"}  # the tied head is written once
    loaded = load(path, tiny_tied_gpt())  # the untuned base: every weight comes from the file
    assert loaded.base.lm_head.weight is loaded.base.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], expected)
