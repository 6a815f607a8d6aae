"""Mixed-prompt batches: every row of a PromptBank batch, whatever prompt it names (or
none, or a composition), computes what that row computes alone with its own prompt file
through PromptedModel; and composing prompts equals one prompt with the pieces joined."""
import itertools

import pytest
import torch

from minipt.checkpoint import load_model
from minipt.generation import generate
from minipt.prompts import PromptConfig, attach, load, save
from minipt.prompts.mixed import MIXABLE, PromptBank

LENGTHS = {"prompt_tuning": 3, "p_tuning": 5, "prefix_tuning": 4, "p_tuning_v2": 2, "adapter": 3}


@pytest.fixture(scope="module")
def prompt_files(llama_dir, tmp_path_factory):
    """One file per mixable method (different lengths, adapters with open gates), plus a
    second soft prompt and prefix for composition."""
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for seed, (name, method, P) in enumerate([(m, m, LENGTHS[m]) for m in MIXABLE]
                                             + [("soft_b", "prompt_tuning", 2),
                                                ("prefix_b", "prefix_tuning", 3)]):
        cfg = PromptConfig.for_method(method, num_virtual_tokens=P, init="random", seed=seed,
                                      encoder_hidden=16, projection_hidden=24, adapter_layers=2)
        model = attach(load_model(llama_dir), cfg)
        with torch.no_grad():
            if method == "adapter":
                model.method.gates.uniform_(-1, 1)
            for p in model.method.parameters():  # larger than init, so prompts visibly differ
                p.mul_(3)
        files[name] = save(model, folder / f"{name}.safetensors")
    return files


@pytest.fixture(scope="module")
def bank(llama_dir, prompt_files):
    bank = PromptBank(load_model(llama_dir))
    for name, path in prompt_files.items():
        bank.add(name, path)
    return bank


def alone(llama_dir, path, ids):
    """Logits of one unpadded row under its own prompt file (or the bare base)."""
    base = load_model(llama_dir)
    model = load(path, base) if path else base
    return model(ids[None])[0][0]


def ragged_batch(lengths, seed=0):
    """Left-padded ids and mask for rows of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, 120, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return ids, mask


PAIRS = list(itertools.combinations([None, *MIXABLE], 2)) + [(m, m) for m in MIXABLE]


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a or 'none'}-{b}" for a, b in PAIRS])
@torch.no_grad()
def test_every_row_of_a_mixed_batch_equals_the_row_alone(llama_dir, prompt_files, bank, pair):
    rows = [pair[0], pair[1], pair[0]]
    ids, mask = ragged_batch([7, 9, 4])
    logits, _ = bank(ids, rows=rows, attention_mask=mask)
    for b, name in enumerate(rows):
        n = int(mask[b].sum())
        expected = alone(llama_dir, prompt_files.get(name), ids[b, -n:])
        assert (logits[b, -n:] - expected).abs().max() <= 1e-5, (b, name)


@torch.no_grad()
def test_mixed_generation_equals_each_prompt_generating_alone(llama_dir, prompt_files, bank):
    rows = [None, *MIXABLE, "soft_b+prefix_tuning+adapter"]
    prompts = [[5 + b, 6, 7, 8][: 2 + b % 3] for b in range(len(rows))]
    together = generate(bank.for_rows(rows), prompts, 6)
    for name, prompt, out in zip(rows, prompts, together):
        if name and "+" in name:
            expected = generate(bank.for_rows([name]), [prompt], 6)[0]
        else:
            base = load_model(llama_dir)
            expected = generate(load(prompt_files[name], base) if name else base, [prompt], 6)[0]
        assert out == expected, name


@torch.no_grad()
def test_composed_soft_prompts_equal_one_prompt_of_both(llama_dir, prompt_files, bank):
    a, b = (load(prompt_files["prompt_tuning"], load_model(llama_dir)),
            load(prompt_files["soft_b"], load_model(llama_dir)))
    joined = attach(load_model(llama_dir), PromptConfig(method="prompt_tuning", num_virtual_tokens=5,
                                                        init="random"))
    joined.method.prompt.copy_(torch.cat([a.method.input_prompt(), b.method.input_prompt()]))
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(2))
    composed, _ = bank(ids, rows=["prompt_tuning+soft_b"])
    assert (composed - joined(ids)[0]).abs().max() <= 1e-5
    assert (composed - bank(ids, rows=["soft_b+prompt_tuning"])[0]).abs().max() > 1e-3   # order matters


@torch.no_grad()
def test_composed_prefixes_equal_one_prefix_of_both(llama_dir, prompt_files, bank):
    a, b = (load(prompt_files[n], load_model(llama_dir)).method for n in ("prefix_tuning", "prefix_b"))
    joined = attach(load_model(llama_dir), PromptConfig(method="prefix_tuning", num_virtual_tokens=7,
                                                        prefix_projection=False))
    ka, kb = a.prefixes(1)["self"], b.prefixes(1)["self"]
    table = torch.stack([torch.stack([torch.cat([x.k, y.k], 2)[0], torch.cat([x.v, y.v], 2)[0]])
                         for x, y in zip(ka, kb)])
    # (L, 2, nkv, P, hs) -> the (P, L * 2 * nkv * hs) table PrefixTuning reads its prefixes from
    joined.method.sites["self"].table.copy_(table.permute(3, 0, 1, 2, 4).reshape(7, -1))
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(3))
    composed, _ = bank(ids, rows=["prefix_tuning+prefix_b"])
    assert (composed - joined(ids)[0]).abs().max() <= 1e-5


def test_bank_refuses_what_it_cannot_mix(llama_dir, bank, tmp_path, converted_dir):
    lora = attach(load_model(llama_dir), PromptConfig(method="lora", lora_r=2))
    path = save(lora, tmp_path / "lora.safetensors")
    before = {k: v.clone() for k, v in bank.base.state_dict().items()}
    with pytest.raises(ValueError, match="lora changes the base weights"):
        bank.add("lora", path)
    # the shared base untouched
    assert all(torch.equal(before[k], v) for k, v in bank.base.state_dict().items())
    with pytest.raises(KeyError, match="unknown prompt 'nope'"):
        bank(torch.ones(1, 3, dtype=torch.long), rows=["nope"])
    with pytest.raises(ValueError, match="'a\\+b' is not a usable name"):
        bank.add("a+b", path)
    with pytest.raises(ValueError, match="decoder-only"):
        PromptBank(load_model(converted_dir("t5-v1.1")))
