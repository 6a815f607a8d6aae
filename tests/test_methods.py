"""Invariants every method keeps, on both families: cached generation equals the uncached
forward, a left-padded row equals that row alone, training moves only the method's
parameters (the base stays bit-identical) and lowers the loss, the trainable count equals
the method's closed form, and a prompt file round-trips."""
import pytest
import torch

from minipt.checkpoint import load_model
from minipt.prompts import PromptConfig, attach, load, method_class, save

from conftest import greedy_by_full_forwards


METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter", "lora"]
FAMILIES = ["llama", "gpt2", "t5", "gemma3"]


@pytest.fixture(scope="module")
def base_dirs(converted_dir):
    return {family: converted_dir("t5-v1.1" if family == "t5" else family) for family in FAMILIES}


def prompted(base_dirs, family, method, device="cpu"):
    cfg = PromptConfig.for_method(method, num_virtual_tokens=4, init="random", encoder_hidden=16,
                       projection_hidden=24, adapter_layers=1, lora_r=2)
    model = attach(load_model(base_dirs[family], device=device), cfg)
    if method == "adapter":  # open the gates: a closed gate is the base model itself
        with torch.no_grad():
            model.method.gates.fill_(0.5)
    if method == "lora":  # B starts at zero; give the update something to say
        with torch.no_grad():
            for name, p in model.method.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_cached_generation_equals_full_forward(base_dirs, family, method, device):
    model = prompted(base_dirs, family, method, device)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    cached = model.generate(prompts, 5)  # one padded batch through the KV cache
    assert cached == [greedy_by_full_forwards(model, p, 5) for p in prompts]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_left_padded_row_equals_row_alone(base_dirs, family, method, device):
    model = prompted(base_dirs, family, method, device)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch, _ = model(ids, attention_mask=mask)
    alone, _ = model(ids[1:, 3:])
    assert (batch[1, 3:] - alone[0]).abs().max() <= 1e-5


def batch_for(family, device="cpu"):
    g = torch.Generator().manual_seed(1)
    if family == "t5":
        return dict(idx=torch.randint(2, 100, (4, 8), generator=g).to(device),
                    targets=torch.randint(2, 100, (4, 5), generator=g).to(device))
    ids = torch.randint(0, 120, (4, 12), generator=g).to(device)
    return dict(idx=ids[:, :-1], targets=ids[:, 1:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_the_method(base_dirs, family, method, device):
    model = prompted(base_dirs, family, method, device)
    frozen = {k: v.clone() for k, v in model.base.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = batch_for(family, device)
    model.train()
    losses = []
    for _ in range(6):
        _, loss = model(batch["idx"], batch["targets"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    method_params = {id(p) for p in model.method.parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in method_params), name
    after = model.base.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert model.num_trainable() == model.method.closed_form_parameters()


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_prompt_file_round_trip(base_dirs, family, method, tmp_path, device):
    model = prompted(base_dirs, family, method, device).eval()
    torch.manual_seed(1)
    for p in model.trainable_parameters():      # away from the seeded start, which load could rebuild
        p.add_(0.1 * torch.randn_like(p))
    batch = batch_for(family, device)
    expected, _ = model(batch["idx"], batch["targets"])
    path = save(model, tmp_path / "p.safetensors")
    again = load(path, load_model(base_dirs[family], device=device)).eval()
    got, _ = again(batch["idx"], batch["targets"])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", METHODS + ["full"])
def test_what_a_method_declares_is_what_it_does(base_dirs, method):
    """The class attributes that train.py, the bank and the file checks read before anything
    is built, against the attached model: positions before the text, a changed base."""
    cls = method_class(method)
    model = prompted(base_dirs, "llama", method) if method != "full" else attach(
        load_model(base_dirs["llama"]), PromptConfig(method="full"))
    assert cls.virtual_positions(model.method.config) == model.extra_positions
    fresh = load_model(base_dirs["llama"])
    # LoRA's wrappers
    swapped = [type(a) for a in model.base.modules()] != [type(b) for b in fresh.modules()]
    assert cls.changes_base == (swapped or cls.trains_base)
    assert cls.trains_base == all(p.requires_grad for p in model.base.parameters())
    assert cls.holds_soft_prompt == (model.method.input_prompt() is not None)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", METHODS + ["full"])
def test_a_prompt_file_refuses_a_foreign_base(base_dirs, family, method, tmp_path):
    """Same architecture with other weights is refused (but for full fine-tuning, whose file
    replaces every weight), and another architecture always."""
    model = prompted(base_dirs, family, method) if method != "full" else attach(
        load_model(base_dirs[family]), PromptConfig(method="full"))
    path = save(model, tmp_path / "p.safetensors")
    other_weights = load_model(base_dirs[family])
    with torch.no_grad():
        other_weights.embed.weight[0] += 1
    if method == "full":
        load(path, other_weights)
    else:
        with pytest.raises(ValueError, match="other weights: embedding hash"):
            load(path, other_weights)
    other_family = load_model(base_dirs["gpt2" if family == "llama" else "llama"])
    with pytest.raises(ValueError, match="trained on a different base model"):
        load(path, other_family)


def test_every_model_kind_implements_the_protocol(base_dirs, tmp_path):
    """What evaluation, generation and the server read, present on every kind of model."""
    from minipt.evaluation import Ensemble
    from minipt.prompts.mixed import PromptBank
    from minipt.protocol import DecodingModel, LanguageModel
    gpt, t5 = load_model(base_dirs["llama"]), load_model(base_dirs["t5"])
    prompted_model = prompted(base_dirs, "llama", "prompt_tuning")
    bank = PromptBank(load_model(base_dirs["llama"]))
    bank.add("soft", save(prompted_model, tmp_path / "soft.safetensors"))
    for model in (gpt, t5, prompted_model, bank.for_rows(["soft", None])):
        assert isinstance(model, DecodingModel), type(model).__name__
    ensemble = Ensemble(bank, ["soft", "soft"])
    assert isinstance(ensemble, LanguageModel) and ensemble.n_members == 2 and ensemble.extra_positions == 4
    assert (gpt.extra_positions, prompted_model.extra_positions) == (0, 4)
