"""What the GPU path picks: attention's SDPA arguments (no mask and is_causal for a batch
without padding, so CUDA can run flash attention; a mask otherwise), no host sync in a
decoding step, and dtype=auto's bf16 only where the GPU really has it. Runs on CPU by
spying on the calls; MINIPT_DEVICE=cuda runs it on a GPU, where the kernel tests at the
end also hold SDPA to its fused kernels."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from minipt import fast
from minipt.checkpoint import resolve_dtype
from minipt.config import GPTConfig
from minipt.gpt import GPT
from minipt.layers import LayerPrefix

from conftest import DEVICE as DEVICE_NAME

DEVICE = torch.device(DEVICE_NAME)                                       # the suite's device switch


def tiny(window=0, **kw):
    """A random GQA decoder (4 query heads over 2 kv heads); with a window, Gemma's layout:
    a local layer, then a global one."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=120, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                    intermediate_size=64, max_seq_len=64, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qkv_bias=False, proj_bias=False, sliding_window=window, global_every=2, **kw)
    return GPT(cfg).to(DEVICE).eval()


def ids_and_mask(B=3, T=12, pad=()):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in pad:
        mask[row, :n] = 0                                                  # left padding
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every F.scaled_dot_product_attention call's mask and is_causal. A causal call is also
    computed with the explicit T x T keep-mask it stands for, and must agree with it."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(SimpleNamespace(mask=attn_mask, is_causal=is_causal, gqa=enable_gqa, T=q.size(2)))
        y = real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if is_causal:
            keep = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
            masked = real(q, k, v, attn_mask=keep, scale=scale, enable_gqa=enable_gqa)
            if q.device.type == "cpu":
                assert torch.equal(y, masked)                              # the same kernel, bit for bit
            else:
                assert torch.allclose(y, masked, atol=1e-5, rtol=1e-5)
        return y

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@torch.no_grad()
def test_a_batch_without_padding_passes_no_mask_and_is_causal(sdpa_calls):
    model = tiny()
    ids, mask = ids_and_mask()
    logits, _ = model(ids, attention_mask=mask)                            # all ones: dropped
    assert [(c.mask, c.is_causal) for c in sdpa_calls] == [(None, True)] * 2
    assert all(c.gqa for c in sdpa_calls)
    # the same logits as the rows get from a padded batch, where the mask is explicit
    sdpa_calls.clear()
    padded_ids, padded_mask = ids_and_mask(B=4, T=14, pad=[(3, 14)])
    padded_ids[:3, 2:], padded_mask[:3, :2] = ids, 0
    ref, _ = model(padded_ids, attention_mask=padded_mask)
    assert all(c.mask is not None and not c.is_causal for c in sdpa_calls)
    assert torch.allclose(logits, ref[:3, 2:], atol=1e-5)


@torch.no_grad()
def test_a_padded_batch_gets_a_keep_mask(sdpa_calls):
    model = tiny()
    ids, mask = ids_and_mask(pad=[(1, 4)])
    with fast.off():                                                       # no unpadding: the (B, T) layout
        model(ids, attention_mask=mask)
    assert len(sdpa_calls) == 2
    for c in sdpa_calls:
        assert not c.is_causal and c.mask.dtype == torch.bool and c.mask.shape == (3, 1, 12, 12)
        assert c.mask.is_contiguous()


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_and_its_gradients_equal_the_masked_ones(plain, dtype):
    """layers.Causal against the explicit keep-mask it stands for, forward and backward: with
    the switch off SDPA runs it (is_causal); on, fast's own attention on CPU (the mask)."""
    from minipt.layers import Causal, attend
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, device=DEVICE, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    keep = torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril()[None, None]
    results = []
    for mask in (Causal(keep), keep):
        with fast.off() if plain else torch.enable_grad():
            y = attend(q, k, v, mask, None)
            results.append([y, *torch.autograd.grad(y.float().square().sum(), (q, k, v))])
    for a, b in zip(*results):
        if DEVICE.type == "cpu":
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a.float(), b.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@torch.no_grad()
def test_prefixes_and_the_cache(sdpa_calls):
    """A joined prefix needs its columns in a mask; a gated one has its own softmax, so the
    text's attention stays causal. Decoding one token sees every key (no mask); a chunk after
    cached positions is causal from the bottom right, not what is_causal means: a mask."""
    model = tiny()
    ids, _ = ids_and_mask()
    k = torch.randn(3, 2, 5, 8, device=DEVICE)
    model(ids, prefixes=[LayerPrefix(k, k), None])
    joined, plain = sdpa_calls
    assert joined.mask.shape == (3, 1, 12, 17) and not joined.is_causal
    assert (plain.mask, plain.is_causal) == (None, True)
    sdpa_calls.clear()
    model(ids, prefixes=[LayerPrefix(k, k, gate=torch.ones(4, device=DEVICE)), None])
    assert [(c.mask, c.is_causal) for c in sdpa_calls] == [(None, True), (None, False), (None, True)]
    sdpa_calls.clear()
    model.setup_cache(3, 20)
    model(ids[:, :8], cache_pos=0)
    model(ids[:, 8:], cache_pos=8)
    model(ids[:, :1], cache_pos=12)
    model.clear_cache()
    prefill, chunk, step = sdpa_calls[::2]
    assert (prefill.mask, prefill.is_causal) == (None, True)
    assert chunk.mask.shape == (1, 1, 4, 12) and not chunk.is_causal
    assert (step.mask, step.is_causal) == (None, False)


@torch.no_grad()
def test_sliding_window_layers(sdpa_calls):
    """Gemma's local layer (window 4): a batch no longer than the window sees nothing hidden
    by it (causal, like the global layer); a longer one needs the window's mask."""
    model = tiny(window=4)
    ids, _ = ids_and_mask(T=4)
    model(ids)
    assert [(c.mask, c.is_causal) for c in sdpa_calls] == [(None, True)] * 2
    sdpa_calls.clear()
    ids, _ = ids_and_mask(T=12)
    model(ids)
    local, full = sdpa_calls
    assert local.mask.shape == (1, 1, 12, 12) and not local.is_causal and local.mask.sum() == 4 * 12 - 6
    assert (full.mask, full.is_causal) == (None, True)


class HostSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: a tensor read as a Python value."""
    NAMES = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_padding_is_asked_once_per_batch_and_never_in_a_decoding_step():
    model = tiny()
    ids, mask = ids_and_mask(pad=[(1, 4)])
    model.setup_cache(3, 20)
    with HostSyncs() as prefill:
        model(ids, attention_mask=mask, cache_pos=0, last_only=True)
    mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
    with HostSyncs() as step:
        model(ids[:, -1:], attention_mask=mask, cache_pos=12, last_only=True)
    model.clear_cache()
    assert prefill.calls == ["__bool__"] and step.calls == []


def fake_gpu(monkeypatch, capability, emulates_bf16=True):
    """torch.cuda answering as a GPU of that compute capability would. Before Ampere (8.0) bf16
    has no tensor cores, but a bf16 tensor can still be made there (emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates_bf16)


@pytest.mark.parametrize("capability, dtype", [((7, 0), "float32"), ((7, 5), "float32"),
                                               ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_is_bf16_only_on_a_gpu_that_multiplies_it(monkeypatch, capability, dtype):
    fake_gpu(monkeypatch, capability)
    assert resolve_dtype("auto", "cuda") == dtype
    assert resolve_dtype("auto", "cuda:0") == dtype
    assert resolve_dtype("float16", "cuda") == "float16"                  # named dtypes stay as given


def test_auto_dtype_on_cpu_is_unchanged(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))                                          # a GPU beside it changes nothing
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if avx512 else "float32")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_dtype("auto", "cpu") == "bfloat16"


# ---- on a GPU: SDPA held to its fused kernels (no math fallback) --------------------------

cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="kernel choice is CUDA's: run with MINIPT_DEVICE=cuda")


@cuda
def test_an_unpadded_bf16_batch_runs_on_flash_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(window=16).to(torch.bfloat16).train()         # the local layer's window hides nothing
    ids, mask = ids_and_mask(T=12)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):                        # raises if flash cannot run it
        _, loss = model(ids, ids, attention_mask=mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss.backward()


@cuda
@pytest.mark.parametrize("use_fast", [True, False])
def test_a_masked_gqa_batch_runs_on_a_fused_kernel(use_fast):
    """Padding, a joined prefix and a gated one: masks with grouped heads, which the math
    kernel alone took while enable_gqa went with the mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny().to(torch.bfloat16).train()
    ids, mask = ids_and_mask(pad=[(1, 4), (2, 9)])
    k = torch.randn(3, 2, 5, 8, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    prefixes = [LayerPrefix(k, k), LayerPrefix(k, k, mask=torch.ones(3, 5, dtype=torch.bool, device=DEVICE),
                                                gate=torch.ones(4, device=DEVICE))]
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(kernels), (torch.enable_grad() if use_fast else fast.off()):
        _, loss = model(ids, ids.masked_fill(mask == 0, -100), attention_mask=mask, prefixes=prefixes)
        loss.backward()
    assert k.grad is not None
    model.eval().setup_cache(3, 16)
    with sdpa_kernel(kernels), torch.no_grad():                            # a padded decoding step, GQA
        model(ids, attention_mask=mask, cache_pos=0, last_only=True)
        model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), cache_pos=12, last_only=True)
    model.clear_cache()
