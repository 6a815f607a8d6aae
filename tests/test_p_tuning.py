"""P-tuning against peft's PromptEncoder (LSTM and MLP) on a tiny Llama, collapsing the
encoder into plain vectors, prompt files that hold both, and T5 with the prompt on the
encoder side through cached generation."""
import pytest
import torch
from peft import PromptEncoderConfig, TaskType, get_peft_model
from safetensors import safe_open

from minipt.checkpoint import load_model
from minipt.generation import pad_batch
from minipt.prompts import PromptConfig, attach, load, save

from conftest import tiny_hf_model

P, H = 5, 16


def p_tuning(kind="lstm", **kw):
    return PromptConfig(method="p_tuning", num_virtual_tokens=P, encoder_type=kind, encoder_hidden=H,
                        init="random", **kw)


def peft_encoder(kind="lstm"):
    """peft's encoder: its output alone, no residual"""
    return p_tuning(kind, encoder_residual=False)


def llama_batch():
    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the prompt goes after it
    return ids, mask


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_logits_and_gradients_match_peft(kind, llama_dir):
    model = attach(load_model(llama_dir), peft_encoder(kind))
    peft = get_peft_model(tiny_hf_model("llama"), PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, encoder_hidden_size=H,
        encoder_reparameterization_type=kind.upper()))
    theirs = peft.prompt_encoder["default"]
    theirs.load_state_dict(model.method.encoder.state_dict())  # same names, same shapes
    assert (model.num_trainable() == model.method.closed_form_parameters()
            == sum(p.numel() for p in theirs.parameters()))
    print(f"p-tuning {kind}: {model.method.describe_count()} = {model.num_trainable():,}")

    ids, _ = llama_batch()
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    labels = ids.clone()
    labels[:, 0] = -100  # else peft also scores the first token from the last virtual one
    ref = peft(input_ids=ids, labels=labels)  # peft shifts the labels itself
    assert (logits - ref.logits[:, P:-1]).abs().max() <= 1e-4
    loss.backward()
    ref.loss.backward()
    ref_grads = dict(theirs.named_parameters())
    for name, p in model.method.encoder.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_collapse_serves_fixed_vectors(llama_dir):
    model = attach(load_model(llama_dir), p_tuning())
    ids, mask = llama_batch()
    expected, _ = model(ids, attention_mask=mask)
    model.method.collapse()
    assert torch.equal(model(ids, attention_mask=mask)[0], expected)
    for p in model.method.encoder.parameters():  # the encoder is no longer run at all
        p.zero_()
    assert torch.equal(model(ids, attention_mask=mask)[0], expected)
    model.method.uncollapse()
    assert (model(ids, attention_mask=mask)[0] - expected).abs().max() > 1e-3


def test_prompt_file_restores_encoder_and_collapsed_prompt(llama_dir, tmp_path):
    model = attach(load_model(llama_dir), p_tuning())
    ids, mask = llama_batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()  # an encoder away from its initial values
    with torch.no_grad():
        expected, _ = model(ids, attention_mask=mask)
    path = save(model, tmp_path / "pt.safetensors")
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
    assert names == {"prompt"} | {f"encoder.{k}" for k in model.method.encoder.state_dict()}

    loaded = load(path, load_model(llama_dir))
    method = loaded.method
    assert method.collapsed is not None  # ready for inference without the encoder
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask)[0], expected)
    for (name, a), b in zip(model.method.encoder.state_dict().items(), method.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError):  # a collapsed prompt has no gradient: training must uncollapse
        loaded(ids[:, :-1], ids[:, 1:])[1].backward()

    method.uncollapse()  # training resumes through the restored encoder
    assert loaded.num_trainable() == method.closed_form_parameters()
    assert all(p.requires_grad for p in method.encoder.parameters())
    with torch.no_grad():
        assert (loaded(ids, attention_mask=mask)[0] - expected).abs().max() <= 1e-6
    opt = torch.optim.AdamW(loaded.trainable_parameters(), lr=1e-2)
    loaded(ids[:, :-1], ids[:, 1:])[1].backward()
    assert all(p.grad is not None for p in method.encoder.parameters())
    opt.step()
    with torch.no_grad():
        assert (loaded(ids, attention_mask=mask)[0] - expected).abs().max() > 1e-4


@torch.no_grad()
def uncached_greedy(model, prompts, n_new):
    """Greedy decoding by running the whole model again for every new token."""
    ids, mask = pad_batch(prompts, model.config.pad_id, left=False)
    dec = torch.full((len(prompts), 1), model.config.decoder_start_id)
    for _ in range(n_new):
        logits, _ = model(ids, decoder_input_ids=dec, attention_mask=mask)
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return dec[:, 1:].tolist()


def test_t5_encoder_prompt_with_cached_generation(t5_dir):
    base = load_model(t5_dir)
    prompts = [[5, 17, 33, 2, 9, 41], [44, 8], [12, 13, 14, 15]]
    ids, mask = pad_batch(prompts, 0, left=False)
    dec = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        before, _ = base(ids, dec, attention_mask=mask)
    model = attach(base, p_tuning(placement="encoder"))
    with torch.no_grad():
        assert model.encode(ids, attention_mask=mask).shape[1] == P + ids.size(1)  # in the encoder input
        assert (model(ids, decoder_input_ids=dec, attention_mask=mask)[0] - before).abs().max() > 1e-3
    assert model.num_trainable() == model.method.closed_form_parameters()

    ref = uncached_greedy(model, prompts, 8)
    assert model.generate(prompts, 8) == ref
    assert len({t for row in ref for t in row}) > 2  # not a degenerate repeat
    model.method.collapse()
    assert model.generate(prompts, 8) == ref
