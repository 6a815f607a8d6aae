"""Mixed-prompt batches: every row of a PromptBank batch, whatever prompt it names (or
none, or a composition), computes what that row computes alone with its own prompt file
through PromptedModel; and composing prompts equals one prompt with the pieces joined.
LoRA rows get their own low-rank update, the shared base untouched."""
import contextlib
import itertools

import pytest
import torch

from minipt import fast
from minipt.checkpoint import load_model
from minipt.generation import generate
from minipt.prompts import PromptConfig, attach, load, lora_rows, save
from minipt.prompts.mixed import MIXABLE, PromptBank

LENGTHS = {"prompt_tuning": 3, "p_tuning": 5, "prefix_tuning": 4, "p_tuning_v2": 2, "adapter": 3}
LORAS = {"lora": dict(lora_r=2, lora_targets=["q_proj", "v_proj"]),          # v_proj in both: ranks padded
         "lora_b": dict(lora_r=3, lora_targets=["v_proj", "gate_proj", "down_proj"])}


@pytest.fixture(scope="module")
def prompt_files(llama_dir, tmp_path_factory):
    """One file per mixable method (different lengths, adapters with open gates, LoRA with a
    random B), plus a second soft prompt, prefix and LoRA (another rank and targets) for
    composition."""
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for seed, (name, method, P) in enumerate([(m, m, LENGTHS.get(m, 0)) for m in MIXABLE]
                                             + [("soft_b", "prompt_tuning", 2),
                                                ("prefix_b", "prefix_tuning", 3), ("lora_b", "lora", 0)]):
        cfg = PromptConfig.for_method(method, num_virtual_tokens=P, init="random", seed=seed,
                                      encoder_hidden=16, projection_hidden=24, adapter_layers=2,
                                      **LORAS.get(name, {}))
        model = attach(load_model(llama_dir), cfg)
        with torch.no_grad():
            if method == "adapter":
                model.method.gates.uniform_(-1, 1)
            if method == "lora":  # B starts at zero: the update would be nothing
                for B in model.method.lora_B.values():
                    B.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
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


PAIRS = list(itertools.combinations([None, *MIXABLE], 2)) + [(m, m) for m in MIXABLE] + [("lora", "lora_b")]


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
    rows = [None, *MIXABLE, "soft_b+prefix_tuning+adapter", "lora_b", "lora+soft_b"]
    prompts = [[5 + b, 6, 7, 8][: 2 + b % 3] for b in range(len(rows))]
    together = generate(bank.for_rows(rows), prompts, 6)
    for name, prompt, out in zip(rows, prompts, together):
        if name == "lora+soft_b":  # the soft prompt on the LoRA'd base
            base = load_model(llama_dir)
            load(prompt_files["lora"], base)
            expected = generate(load(prompt_files["soft_b"], base), [prompt], 6)[0]
        elif name and "+" in name:
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


@torch.no_grad()
def test_lora_rows_packed_and_padded(llama_dir, prompt_files, bank, monkeypatch):
    """A ragged batch of LoRA rows takes the packed kernel (one product pair per adapter over
    its tokens) with fast on, the gathered one (a batched product over the rows) with it off:
    each row equals the row alone either way."""
    calls = []

    def spy(name):
        kernel = getattr(lora_rows, name)
        return lambda *args: calls.append(name) or kernel(*args)
    for name in ("gathered", "segmented"):
        monkeypatch.setattr(lora_rows, name, spy(name))
    rows = ["lora", None, "lora_b", "lora+soft_b", "lora_b+prefix_tuning"]
    ids, mask = ragged_batch([6, 3, 8, 5, 7], seed=1)
    for switch, kernel in ((contextlib.nullcontext, "segmented"), (fast.off, "gathered")):
        with switch():
            calls.clear()
            logits, _ = bank(ids, rows=rows, attention_mask=mask)
            assert set(calls) == {kernel}
            for b, name in enumerate(rows):
                n = int(mask[b].sum())
                if "+" in (name or ""):  # (test_mixed_generation checks "lora+soft_b" against its own model)
                    expected = bank(ids[b:b + 1, -n:], rows=[name])[0][0]
                else:
                    expected = alone(llama_dir, prompt_files.get(name), ids[b, -n:])
                assert (logits[b, -n:] - expected).abs().max() <= 1e-5, (kernel, b, name)


@torch.no_grad()
def test_lora_rows_leave_the_base_and_the_other_rows_alone(llama_dir, prompt_files):
    """The base's weights stay bit for bit what they were (nothing merged); rows without a
    LoRA compute exactly what they compute in a batch without LoRA rows, and the bare base
    exactly its own output outside lora_rows; a running row keeps its LoRA when the file goes."""
    bank, fresh = PromptBank(load_model(llama_dir)), load_model(llama_dir)
    for name in ("lora", "lora_b", "prefix_tuning"):
        bank.add(name, prompt_files[name])
    ids, mask = ragged_batch([5, 8, 6, 7], seed=2)
    with_lora, _ = bank(ids, rows=["lora", None, "lora_b+prefix_tuning", None], attention_mask=mask)
    without, _ = bank(ids, rows=[None, None, "prefix_tuning", None], attention_mask=mask)
    assert torch.equal(with_lora[[1, 3]], without[[1, 3]])
    assert (with_lora[2] - without[2]).abs().max() > 1e-3                      # the LoRA matters
    assert torch.equal(bank.base(ids, attention_mask=mask)[0], fresh(ids, attention_mask=mask)[0])
    # as the server's decoding step would: the base itself, inside lora_rows
    with bank.lora_rows(bank.batch_layout(["lora", None])):
        stepped, _ = bank.base(ids[:2, -5:])
    assert all(w.rows is None for w in bank.row_lora.values())
    assert (stepped[0] - alone(llama_dir, prompt_files["lora"], ids[0, -5:])).abs().max() <= 1e-5
    assert torch.equal(stepped[1], bank.base(ids[:2, -5:])[0][1])
    with bank.lora_rows(bank.batch_layout([None, "prefix_tuning"])):   # no LoRA row: nothing activated
        assert all(w.rows is None for w in bank.row_lora.values())
    pieces = bank.resolve("lora")
    bank.remove("lora")
    again, _ = bank(ids, rows=[pieces, None, "lora_b+prefix_tuning", None], attention_mask=mask)
    assert torch.equal(again, with_lora)
    # the same tensors, in order (a wrapped layer's keys gain ".base")
    before, after = list(fresh.state_dict().values()), list(bank.base.state_dict().values())
    assert len(before) == len(after) and all(map(torch.equal, before, after))


@torch.no_grad()
def test_a_lora_model_mixes_like_its_file(llama_dir, prompt_files, bank):
    """A PromptedModel with a LoRA gives the bank its A/B pairs; one attached to the bank's
    own base would change every row, and is refused."""
    other = PromptBank(load_model(llama_dir))
    other.add("lora", load(prompt_files["lora"], load_model(llama_dir)))
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(4))
    assert torch.equal(other(ids, rows=["lora", None])[0], bank(ids, rows=["lora", None])[0])
    base = load_model(llama_dir)
    own = PromptBank(base)
    with pytest.raises(ValueError, match="attached to the bank's own base"):
        own.add("lora", load(prompt_files["lora"], base))


def test_bank_refuses_what_it_cannot_mix(llama_dir, bank, tmp_path, converted_dir):
    full = attach(load_model(llama_dir), PromptConfig(method="full"))
    path = save(full, tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="full replaces every weight of the base, so it can only be served "
                                         "as its own base"):
        bank.add("full", path)
    with pytest.raises(ValueError, match="a row takes one LoRA"):
        bank(torch.ones(1, 3, dtype=torch.long), rows=["lora+lora_b"])
    with pytest.raises(KeyError, match="unknown prompt 'nope'"):
        bank(torch.ones(1, 3, dtype=torch.long), rows=["nope"])
    with pytest.raises(ValueError, match="'a\\+b' is not a usable name"):
        bank.add("a+b", path)
    with pytest.raises(ValueError, match="decoder-only"):
        PromptBank(load_model(converted_dir("t5-v1.1")))
