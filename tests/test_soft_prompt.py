"""Soft prompt tuning against peft, its initialisations, placement after padding, cached
generation, and prompt files."""
import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from minipt.checkpoint import load_model
from minipt.convert import convert
from minipt.prompts import PromptConfig, attach, load, save
from minipt.prompts.model import insert_at, leading_pads
from minipt.prompts.soft_prompt import COMMON_TOKENS

from conftest import save_tiny_hf, tiny_hf_model
from test_t5 import hf_t5

P = 5


def converted(hf, tmp_path):
    save_tiny_hf(hf, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "minipt")
    return load_model(tmp_path / "minipt")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_and_gradient_match_peft(kind, tmp_path):
    hf = tiny_hf_model(kind)
    model = attach(converted(hf, tmp_path), PromptConfig(num_virtual_tokens=P, init="random"))
    peft = get_peft_model(hf, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    peft_prompt = peft.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        peft_prompt.copy_(model.method.prompt)
    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    labels = ids.clone()
    labels[:, 0] = -100  # else peft also scores the first token from the last virtual one
    ref = peft(input_ids=ids, labels=labels)  # peft shifts the labels itself
    assert (logits - ref.logits[:, P:-1]).abs().max() <= 1e-4
    loss.backward()
    ref.loss.backward()
    assert torch.allclose(model.method.prompt.grad, peft_prompt.grad, atol=1e-6)


def test_t5_encoder_prompt_matches_peft(tmp_path):
    hf = hf_t5("v1.1")
    model = attach(converted(hf, tmp_path), PromptConfig(num_virtual_tokens=P, init="random"))
    peft = get_peft_model(hf, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P))
    with torch.no_grad():  # peft sizes the table for encoder and decoder; the encoder reads the first P
        peft.prompt_encoder["default"].embedding.weight[:P].copy_(model.method.prompt)
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, targets=labels)
    ref = peft(input_ids=ids, labels=labels)
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    loss.backward()
    ref.loss.backward()
    peft_grad = peft.prompt_encoder["default"].embedding.weight.grad
    assert torch.allclose(model.method.prompt.grad, peft_grad[:P], atol=1e-6)
    assert not peft_grad[P:].any()          # the decoder's rows of peft's table are never read


def test_parameter_count_is_tokens_times_d_model(tmp_path):
    model = attach(converted(hf_t5("v1.0"), tmp_path), PromptConfig(num_virtual_tokens=100, init="random"))
    assert model.num_trainable() == model.method.closed_form_parameters() == 100 * 32
    print(f"soft prompt: {model.method.describe_count()} = {model.num_trainable():,}")


class StubTokenizer:
    """Just enough of a tokenizer for the text/labels initialisations."""
    special_tokens, pad_id, eos_id, bos_id = {}, None, None, None

    def encode(self, text):
        return [ord(c) % 100 for c in text]


def test_initialisations(tmp_path):
    base = converted(tiny_hf_model("llama"), tmp_path)
    emb = base.embed.weight
    rand = attach(base, PromptConfig(num_virtual_tokens=P, init="random")).method.prompt
    assert rand.abs().max() <= 0.5 and rand.std() > 0.1
    vocab = attach(base, PromptConfig(num_virtual_tokens=P, init="vocab")).method.prompt
    assert all(any(torch.equal(row, e) for e in emb[:COMMON_TOKENS]) for row in vocab)
    tok = StubTokenizer()
    text = attach(base, PromptConfig(num_virtual_tokens=P, init="text", init_text="abc"), tok).method.prompt
    assert torch.equal(text, emb[[97 % 100, 98 % 100, 99 % 100, 97 % 100, 98 % 100]])
    labels = attach(base, PromptConfig(num_virtual_tokens=P, init="labels", init_labels=["b", "cd"]),
                    tok).method.prompt
    assert torch.equal(labels[0], emb[98]) and torch.allclose(labels[1], emb[[99, 0]].mean(0))
    with pytest.raises(ValueError, match="init_text"):
        attach(base, PromptConfig(init="text"), tok)


@torch.no_grad()
def test_prompt_goes_after_left_padding(tmp_path):
    model = attach(converted(tiny_hf_model("qwen2"), tmp_path),
                   PromptConfig(num_virtual_tokens=P, init="random"))
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    batch, _ = model(ids, attention_mask=mask)
    alone, _ = model(ids[1:, 4:])
    assert (batch[1, 4:] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("family,method,checkpointing,padded", [
    ("llama", "prompt_tuning", False, True), ("llama", "prompt_tuning", True, True),
    ("llama", "p_tuning", False, True), ("llama", "p_tuning", True, True),
    ("llama", "prompt_tuning", False, False), ("gpt2", "prompt_tuning", False, True)])
def test_prompt_run_once_per_batch_equals_prompt_in_every_row(family, method, checkpointing, padded,
                                                              tmp_path):
    """Training runs the virtual tokens once per batch (GPT.forward's `shared`); the loss
    and gradient must equal those of the prompt inserted into each (left-padded) row."""
    model = attach(converted(tiny_hf_model(family), tmp_path),
                   PromptConfig.for_method(method, num_virtual_tokens=P, init="random"))
    model.base.grad_checkpointing = checkpointing
    model.train()
    ids = torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = mask[2, :6] = 0
    targets = torch.where(mask.bool(), ids.roll(-1, 1), -100)
    targets[:, -1] = -100

    _, loss = model(ids, targets, attention_mask=mask)
    grads = torch.autograd.grad(loss, model.trainable_parameters())

    at = leading_pads(mask)
    prompt = model.method.input_prompt()[None].expand(3, -1, -1)
    _, ref_loss = model.base(inputs_embeds=insert_at(model.base.embed(ids), prompt, at),
                             targets=insert_at(targets, targets.new_full((3, P), -100), at),
                             attention_mask=insert_at(mask, mask.new_ones(3, P), at))
    ref_grads = torch.autograd.grad(ref_loss, model.trainable_parameters())
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("where", ["gpt", "t5-encoder", "t5-decoder"])
def test_cached_generation_equals_full_forward(where, tmp_path):
    hf = tiny_hf_model("llama") if where == "gpt" else hf_t5("v1.0")
    placement = "decoder" if where == "t5-decoder" else "encoder"
    model = attach(converted(hf, tmp_path),
                   PromptConfig(num_virtual_tokens=P, init="random", placement=placement))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    cached = model.generate(prompts, 6)
    for prompt, out in zip(prompts, cached):
        seq = []
        for _ in range(6):  # greedy by full forwards, no cache
            if where == "gpt":
                logits, _ = model(torch.tensor([prompt + seq]))
            else:
                dec = torch.tensor([[model.config.decoder_start_id] + seq])
                logits, _ = model(torch.tensor([prompt]), decoder_input_ids=dec)
            seq.append(logits[0, -1].argmax().item())
        assert out == seq


def test_training_touches_only_the_prompt(tmp_path):
    base = converted(tiny_hf_model("llama"), tmp_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = attach(base, PromptConfig(num_virtual_tokens=P, init="random"))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    ids = torch.randint(0, 120, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["method.prompt"]
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_prompt_file_round_trip_and_refusals(tmp_path):
    base = converted(tiny_hf_model("llama"), tmp_path)
    model = attach(base, PromptConfig(num_virtual_tokens=P, init="random"))
    with torch.no_grad():
        model.method.prompt.mul_(-2)           # away from the seeded start, which load could rebuild
    path = save(model, tmp_path / "task.safetensors")
    assert path.stat().st_size < P * 64 * 4 + 4096  # the vectors plus a small header
    again = load(path, base)
    assert torch.equal(again.method.prompt, model.method.prompt)

    other = converted(tiny_hf_model("qwen2"), tmp_path / "other")
    with pytest.raises(ValueError, match="different base model"):
        load(path, other)
    reseeded = load_model(tmp_path / "minipt")
    with torch.no_grad():
        reseeded.embed.weight[0] += 1.0
    with pytest.raises(ValueError, match="other weights"):
        load(path, reseeded)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.safetensors"):
        load(bad, base)
