"""The decoder against transformers on tiny random GPT-2, Llama (GQA) and Qwen2 (QKV bias)
checkpoints, converted by the real converter; and the KV-cache invariant."""
import pytest
import torch

from minipt.checkpoint import load_model
from minipt.config import GPTConfig
from minipt.convert import convert
from minipt.generation import generate
from minipt.gpt import GPT
from minipt.layers import LayerPrefix
from minipt.prompts import PromptConfig, attach

from conftest import save_tiny_hf, tiny_hf_model

KINDS = ["gpt2", "llama", "qwen2"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(transformers model, minipt model converted from its saved directory)."""
    hf = tiny_hf_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_hf(hf, root / "hf")
    convert(root / "hf", root / "minipt")
    return hf, load_model(root / "minipt")


def batch(seed=0, B=3, T=12, V=120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, :9] = 0
    return ids, mask


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, model = pair
    ids, _ = batch()
    ours, _ = model(ids)
    assert (ours - hf(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_logits_match_transformers(pair):
    hf, model = pair
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    ours, _ = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours - ref)[real].abs().max() <= 1e-4


def test_loss_matches_transformers(pair):
    hf, model = pair
    ids, _ = batch()
    targets = ids[:, 1:].clone()
    targets[0, :5] = -100
    _, loss = model(ids[:, :-1], targets)
    labels = torch.cat([torch.full((ids.size(0), 1), -100), targets], 1)  # HF shifts labels itself
    ref = hf(ids, labels=labels).loss
    assert torch.allclose(loss, ref, atol=1e-5)
    no_logits, head_where_needed = model(ids[:, :-1], targets, loss_only=True)
    assert no_logits is None and torch.allclose(head_where_needed, ref, atol=1e-5)


def test_padding_is_left_out_of_all_but_attention(pair):
    """A left-padded batch runs its norms, projections and MLPs on the real tokens only
    (fast.Unpadded); loss and input gradients still match transformers on the padded batch."""
    hf, model = pair
    ids, mask = batch()
    real = mask.bool()
    no_target = torch.full((ids.size(0), 1), -100)
    targets = torch.cat([ids[:, 1:], no_target], 1).masked_fill(~real, -100)
    labels = torch.cat([no_target, targets[:, :-1]], 1)                  # HF shifts labels itself
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = []
    hook = model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    grads, losses = [], []
    for run in (lambda e: model(inputs_embeds=e, targets=targets, attention_mask=mask)[1],
                lambda e: hf(inputs_embeds=e, attention_mask=mask, position_ids=positions,
                             labels=labels).loss):
        emb = model.embed(ids).detach().requires_grad_()
        loss = run(emb)
        loss.backward()
        losses.append(loss.detach())
        grads.append(emb.grad[real])
    hook.remove()
    assert seen == [(int(mask.sum()), model.config.n_embd)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()


@torch.no_grad()
def test_cached_decoding_equals_full_forward(pair):
    hf, model = pair
    ids, mask = batch(seed=1)
    full, _ = model(ids, attention_mask=mask)
    model.setup_cache(ids.size(0), ids.size(1))
    step_logits = [model(ids[:, :5], attention_mask=mask[:, :5], cache_pos=0)[0]]
    for t in range(5, ids.size(1)):
        step_logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache_pos=t)[0])
    model.clear_cache()
    real = mask.bool()
    assert (torch.cat(step_logits, 1) - full)[real].abs().max() <= 1e-4


def test_greedy_matches_transformers_generate(pair):
    hf, model = pair
    prompts = [[5, 17, 33, 2, 9], [44, 8], [1, 2, 3, 4, 5, 6, 7, 8]]
    ours = generate(model, prompts, 16)
    for prompt, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out == ref[0, len(prompt):].tolist()


@torch.no_grad()
def test_inputs_embeds_equal_ids(pair):
    _, model = pair
    ids, mask = batch()
    a, _ = model(ids, attention_mask=mask)
    b, _ = model(inputs_embeds=model.embed(ids), attention_mask=mask)
    assert torch.equal(a, b)


@torch.no_grad()
def test_zero_gate_prefix_leaves_output_unchanged(pair):
    _, model = pair
    cfg = model.config
    ids, mask = batch()
    k = torch.randn(ids.size(0), cfg.n_kv_head, 4, cfg.head_dim)
    gated = [LayerPrefix(k, torch.randn_like(k), gate=torch.zeros(cfg.n_head)) for _ in range(cfg.n_layer)]
    a, _ = model(ids, attention_mask=mask)
    b, _ = model(ids, attention_mask=mask, prefixes=gated)
    assert torch.equal(a, b)
    plain = [LayerPrefix(k, torch.randn_like(k)) for _ in range(cfg.n_layer)]
    c, _ = model(ids, attention_mask=mask, prefixes=plain)
    assert (a - c).abs().max() > 1e-3  # a real prefix does change the output


@torch.no_grad()
def test_prefix_with_cache_equals_full_forward(pair):
    _, model = pair
    cfg = model.config
    ids, mask = batch(seed=2)
    k = torch.randn(ids.size(0), cfg.n_kv_head, 3, cfg.head_dim)
    prefixes = [LayerPrefix(k, torch.randn_like(k)) for _ in range(cfg.n_layer)]
    full, _ = model(ids, attention_mask=mask, prefixes=prefixes)
    model.setup_cache(ids.size(0), ids.size(1))
    steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache_pos=0, prefixes=prefixes)[0]]
    for t in range(6, ids.size(1)):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache_pos=t,
                           prefixes=prefixes)[0])
    model.clear_cache()
    assert (torch.cat(steps, 1) - full)[mask.bool()].abs().max() <= 1e-4


def test_gradient_checkpointing_gives_same_gradients(pair):
    _, model = pair
    ids, _ = batch()
    grads = []
    for ckpt in (False, True):
        emb = model.embed(ids).detach().requires_grad_()
        model.train()
        model.grad_checkpointing = ckpt
        _, loss = model(inputs_embeds=emb[:, :-1], targets=ids[:, 1:])
        loss.backward()
        grads.append(emb.grad)
    model.grad_checkpointing = False
    model.eval()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_compiled_blocks_train_like_eager(method):
    """GPT.compile_layers (train.py --compile=true) on a padded batch, with the soft prompt
    packed in front of the batch's tokens, or LoRA inside the projections: the same loss and
    gradients as eager, in fp32; inference stays eager (the compiled blocks are not called)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=120, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                    intermediate_size=64, max_seq_len=64, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qkv_bias=False, proj_bias=False)
    model = attach(GPT(cfg), PromptConfig.for_method(method, num_virtual_tokens=3, init="random")).train()
    ids, mask = batch()
    targets = ids.masked_fill(~mask.bool(), -100)
    results = []
    for compiled in (False, True):
        if compiled:
            model.base.compile_layers()
        _, loss = model(ids, targets, attention_mask=mask, loss_only=True)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.trainable_parameters()]))
        model.zero_grad(set_to_none=True)
    (loss, grads), (compiled_loss, compiled_grads) = results
    assert torch.allclose(loss, compiled_loss, atol=1e-6)
    for g, h in zip(grads, compiled_grads):
        assert (g - h).abs().max() <= 1e-5 * g.abs().max()
    calls = []
    model.base.compiled_layers = [lambda *a: calls.append(a)] * cfg.n_layer
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert not calls


def test_lookup_decoding_equals_greedy(pair, monkeypatch):
    """Prompt-lookup drafts, right or wrong, leave greedy decoding's tokens unchanged. These
    random models loop, so drafts are found and accepted; every other draft gets its second
    token spoiled, so drafts are also cut short and their cache positions written over."""
    _, model = pair
    from minipt import generation
    assert generation._lookup_draft([5, 6, 7, 8, 5, 6, 7], 3) == [8, 5, 6]    # after the last [5, 6, 7]
    assert generation._lookup_draft([9, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]     # a loop goes on
    assert generation._lookup_draft([1, 2, 3, 4], 3) == []
    real, drafts = generation._lookup_draft, []

    def spoiled(seq, n_max):
        draft = real(seq, n_max)
        if len(draft) > 1 and len(drafts) % 2:
            draft = [draft[0], (draft[1] + 1) % model.config.vocab_size, *draft[2:]]
        drafts.append(draft)
        return draft

    monkeypatch.setattr(generation, "_lookup_draft", spoiled)
    forwards = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (forwards.append(1), forward(*a, **k))[1])
    prompt = [3, 4, 5, 6] * 4
    plain = generate(model, [prompt], 30)
    per_token = len(forwards)
    for k in (2, 5):
        forwards.clear()
        assert generate(model, [prompt], 30, lookup=k) == plain
        assert len(forwards) < per_token - 4, (k, len(forwards))   # accepted drafts: tokens without a forward
    assert sum(len(d) > 1 for d in drafts) >= 4
