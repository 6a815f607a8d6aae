"""Tensors follow the model's device. Every forward, training step, generation (greedy,
seeded sampling, prompt lookup), rank classification and mixed-prompt batch, of both
families and every method, names the device of each tensor it makes; seeded sampling draws
from a generator on the logits' device.

A CPU shows it: under `torch.device("meta")` as the default device, a factory call
(torch.zeros, torch.tensor, ...) that names no device makes a meta tensor, and the first op
that mixes it with the model's real tensors raises. MINIPT_DEVICE=cuda runs the same checks
with the models on the GPU."""
from types import SimpleNamespace

import pytest
import torch

from minipt import training
from minipt.checkpoint import load_model
from minipt.data import Batches
from minipt.evaluation import rank_classify
from minipt.generation import decode_steps, generate
from minipt.prompts import PromptConfig, attach, save
from minipt.prompts.mixed import MIXABLE, PromptBank

METHODS = ["base", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter", "lora"]
FAMILIES = ["llama", "gemma3", "t5-v1.1"]


def nothing_made_without_a_device():
    return torch.device("meta")


def method_config(method, seed=0):
    return PromptConfig.for_method(method, num_virtual_tokens=3, init="random", seed=seed, encoder_hidden=16,
                                   projection_hidden=24, adapter_layers=2, lora_r=2)


def model_for(directory, method, device):
    base = load_model(directory, device=device)
    return base if method == "base" else attach(base, method_config(method))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_forward_training_and_generation_name_every_device(converted_dir, family, method, device):
    model = model_for(converted_dir(family), method, device)
    t5 = family.startswith("t5")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (2, 9), generator=g).to(device)
    targets = torch.randint(2, 100, (2, 5), generator=g).to(device) if t5 else ids
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with nothing_made_without_a_device():
        model(ids, targets=targets)                                 # no padding: no mask at all
        model(ids, targets=targets, attention_mask=mask)
        model.train()
        model(ids, targets=targets, attention_mask=mask, **({} if t5 else {"loss_only": True}))[1].backward()
        model.eval()
        prompts = [[5, 6, 7, 8], [9, 10]]
        generate(model, prompts, 3)
        generate(model, prompts, 3, temperature=1.0, top_k=5, top_p=0.9, seed=1)
        if not t5:
            generate(model, [[5, 6, 7, 5, 6, 7, 5]], 4, lookup=3)


class SmallIds:
    """A tokenizer of ids below 52, for the tiny models' 120-token vocabularies."""
    bos_id, pad_id, eos_id, add_bos = None, 0, 1, False

    def __init__(self, t5):
        self.t5 = t5

    def encode(self, text, add_eos=True):
        return [2 + ord(c) % 50 for c in text] + ([self.eos_id] if add_eos and self.t5 else [])


@pytest.mark.parametrize("family", ["llama", "t5-v1.1"])
@pytest.mark.parametrize("labels", [[" yes", " no"], [" yes", " no way"]], ids=["one token", "several"])
def test_rank_classification_names_every_device(converted_dir, family, labels, device):
    model = load_model(converted_dir(family), device=device)
    rows = [{"input": "a b", "target": labels[0]}, {"input": "cde", "target": labels[1]}]
    with nothing_made_without_a_device():
        rank_classify(model, SmallIds(family.startswith("t5")), rows, "{input}:", labels)


def test_mixed_batches_name_every_device(converted_dir, device, tmp_path):
    directory = converted_dir("llama")
    bank = PromptBank(load_model(directory, device=device))
    for seed, method in enumerate(MIXABLE):
        bank.add(method, save(attach(load_model(directory), method_config(method, seed)),
                              tmp_path / f"{method}.safetensors"))
    rows = [*MIXABLE, None]
    ids = torch.randint(2, 100, (len(rows), 7), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with nothing_made_without_a_device():
        bank(ids, rows=rows, attention_mask=mask)
        generate(bank.for_rows(rows), [[5, 6, 7]] * len(rows), 3)
        list(decode_steps(bank.for_rows(rows), [[5, 6, 7]] * len(rows), 3, temperature=1.0,
                          seed=list(range(len(rows)))))


def test_seeded_sampling_draws_on_the_model_device(converted_dir, device, monkeypatch):
    """torch.multinomial refuses a generator on another device than its probabilities: a
    CPU generator (torch.Generator() names none) fails seeded sampling on a GPU."""
    made, real = [], torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda *a, **k: made.append(k.get("device")) or real(*a, **k))
    llama, t5 = (load_model(converted_dir(family), device=device) for family in ("llama", "t5-v1.1"))
    for model in (llama, t5):
        generate(model, [[5, 6, 7]], 2, temperature=1.0, seed=0)
    list(decode_steps(llama, [[5, 6, 7]], 2, temperature=1.0, seed=0))
    on = next(llama.parameters()).device
    assert len(made) == 3 and all(d is not None and torch.device(d) == on for d in made), made


# ---- training on a device: one GPU per rank, reductions there, every device's RNG saved -------

@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices as far as torch.cuda's queries tell; what set_device is given; TF32
    switched back after the test."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield chosen
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def torchrun_env(monkeypatch, local_rank, world=2):
    for key, value in dict(RANK=local_rank, LOCAL_RANK=local_rank, WORLD_SIZE=world).items():
        monkeypatch.setenv(key, str(value))
    backends = []
    monkeypatch.setattr(torch.distributed, "init_process_group", backends.append)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: local_rank)
    return backends


def test_each_rank_trains_on_its_own_gpu_over_nccl(fake_gpus, monkeypatch):
    backends = torchrun_env(monkeypatch, local_rank=1)
    assert training.setup_distributed("cuda") == (1, 2, "cuda:1")
    assert fake_gpus == ["cuda:1"] and backends == ["nccl"]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32   # fp32 runs in TF32


def test_a_rank_beyond_the_gpus_is_refused(fake_gpus, monkeypatch):
    torchrun_env(monkeypatch, local_rank=2, world=3)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2: cuda:2: no such GPU, this machine has 2"):
        training.setup_distributed("cuda")


def test_cpu_ranks_use_gloo_and_leave_cuda_alone(fake_gpus, monkeypatch):
    backends = torchrun_env(monkeypatch, local_rank=1)
    assert training.setup_distributed("cpu") == (1, 2, "cpu")
    assert backends == ["gloo"] and fake_gpus == [] and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert training.setup_distributed("cuda") == (0, 1, "cuda") and fake_gpus == []


def test_all_sum_reduces_a_float64_tensor_on_the_training_device(monkeypatch, device):
    """NCCL reduces CUDA tensors only: a CPU tensor is refused there (meta shows the device
    is the one given, whatever it is)."""
    class Reduced(Exception):
        pass
    seen = []

    def all_reduce(t):
        seen.append(t)
        if t.device.type == "meta":
            raise Reduced
        t.mul_(2)                                                    # two ranks with the same value
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        training.all_sum(3.0, 2, torch.device("meta"))
    assert seen[0].device.type == "meta" and seen[0].dtype == torch.float64 and seen[0].shape == (1,)
    assert training.all_sum(torch.tensor(1.5, dtype=torch.float64, device=device), 2, device) == 3.0
    assert seen[1].device == torch.empty(0, device=device).device
    assert training.all_sum(7, 1) == 7.0 and not seen[2:]            # one process: nothing to reduce


def checkpoint_parts():
    method = SimpleNamespace(state_for_saving=dict, load_saved=lambda state: None)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    return SimpleNamespace(method=method), optimizer, Batches(8, 2, seed=0)


def test_checkpoints_carry_every_gpus_rng_state(fake_gpus, monkeypatch, tmp_path):
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    training.save_checkpoint(tmp_path / "checkpoint.pt", 3, *checkpoint_parts())
    state = training.read_checkpoint(tmp_path / "checkpoint.pt")
    assert training.restore_checkpoint(state, *checkpoint_parts()) == 3
    assert [d for d, _ in restored] == [0, 1] and all(torch.equal(s, r) for s, (_, r) in zip(states, restored))

    restored.clear()                             # a checkpoint from before "cuda_rng" still resumes
    del state["cuda_rng"]
    assert training.restore_checkpoint(state, *checkpoint_parts()) == 3 and restored == []


def test_attaching_p_tuning_leaves_the_global_rng_alone(converted_dir, monkeypatch, device):
    """Its encoder is drawn from a generator of its own: no seeding of the global CPU or
    CUDA generators (torch.manual_seed would reseed every GPU) and no draw from them."""
    seeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, name=name: seeded.append(name))
    before = torch.get_rng_state()
    encoders = []
    for kind in ("lstm", "mlp"):
        config = PromptConfig.for_method("p_tuning", num_virtual_tokens=3, init="random", encoder_type=kind,
                                         encoder_hidden=16, seed=5)
        encoders.append([attach(load_model(converted_dir("llama"), device=device), config).method.encoder
                         .state_dict() for _ in range(2)])
    assert torch.equal(torch.get_rng_state(), before) and seeded == []
    for a, b in encoders:                                          # and the seed still decides it
        assert all(torch.equal(a[k], b[k]) for k in a)
