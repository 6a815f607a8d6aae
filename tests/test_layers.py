"""The memory-saving autograd functions of fast.py against autograd through the plain
formulas they replace: same outputs, same gradients, for every input that needs one; and the
decoding shortcuts (few-row products, one-query attention) against the plain ops."""
import pytest
import torch
import torch.nn.functional as F

from minipt import fast
from minipt.fast import ExplicitAttention, RMSNormFunction, SiluMulFunction

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def grads_of(fn, inputs, seed=0):
    """(output, gradients of every input that requires grad) for a fixed random upstream gradient."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, [x for x in inputs if x.requires_grad], upstream)
    return out, grads


def assert_same(ours, ref, dtype):
    (out, grads), (ref_out, ref_grads) = ours, ref
    scale = lambda t: max(1.0, t.abs().max().item())
    assert (out.float() - ref_out.float()).abs().max() <= TOL[dtype] * scale(ref_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert (g.float() - r.float()).abs().max() <= TOL[dtype] * scale(r.float())


def rand(*shape, dtype, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trained", [False, True])
def test_rms_norm(dtype, weight_trained):
    x, w = rand(3, 5, 16, dtype=dtype, seed=0), rand(16, dtype=dtype, seed=1, grad=weight_trained)
    plain = lambda x, w: w * F.rms_norm(x.float(), (16,), eps=1e-6).to(x.dtype)
    assert_same(grads_of(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), [x, w]), grads_of(plain, [x, w]),
                dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gate, up = rand(4, 7, 32, dtype=dtype, seed=2), rand(4, 7, 32, dtype=dtype, seed=3)
    assert_same(grads_of(SiluMulFunction.apply, [gate, up]), grads_of(lambda g, u: F.silu(g) * u, [gate, up]),
                dtype)


def plain_attention(q, k, v, mask, scale):
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1).to(q.dtype) @ v


@pytest.mark.parametrize("block", [64, 2])   # one block of queries; blocks of 2 over the keys each sees
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa-causal-padded", "mha-no-mask", "trained-bias", "per-head-mask"])
def test_explicit_attention(dtype, case, block, monkeypatch):
    monkeypatch.setattr(fast, "QUERY_BLOCK", block)
    B, H, T, S, hs = 2, 6, 5, 8, 4
    nkv = 2 if case.startswith("gqa") else H
    q, k, v = (rand(B, H, T, hs, dtype=dtype, seed=4), rand(B, nkv, S, hs, dtype=dtype, seed=5),
               rand(B, nkv, S, hs, dtype=dtype, seed=6))
    mask = None
    if case == "gqa-causal-padded":  # a prefix of 3 columns, then causal text; row 1 has 2 padded keys
        keep = torch.ones(B, 1, T, S, dtype=torch.bool)
        keep[:, :, :, 3:] = torch.ones(T, T, dtype=torch.bool).tril()
        keep[1, :, :, 3:5] = False
        keep[1, :, :2, 3:5] = torch.eye(2, dtype=torch.bool)  # a padded query still sees itself
        mask = keep
    elif case == "trained-bias":  # T5's relative position bias under full fine-tuning
        mask = rand(1, H, T, S, dtype=torch.float32, seed=7)
    elif case == "per-head-mask":
        mask = torch.rand(B, H, T, S, generator=torch.Generator().manual_seed(8)) > 0.3
        mask[..., 0] = True
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    ours = lambda q, k, v, m=None: ExplicitAttention.apply(q, k, v, m, 0.5)
    plain = lambda q, k, v, m=None: plain_attention(q, k, v, m, 0.5)
    assert_same(grads_of(ours, inputs), grads_of(plain, inputs), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_query_decoding_path_equals_sdpa(dtype):
    """16-bit decoding (one query, no grad) skips SDPA on CPU; same result, padded keys masked."""
    from minipt.layers import attend
    q, k, v = (rand(2, 6, 1, 8, dtype=dtype, seed=9), rand(2, 2, 7, 8, dtype=dtype, seed=10),
               rand(2, 2, 7, 8, dtype=dtype, seed=11))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., :3] = False
    with torch.no_grad():
        ours = attend(q, k, v, mask, None)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert (ours.float() - ref).abs().max() <= TOL[torch.bfloat16]


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3, 1), (8,), (2, 5)])
@pytest.mark.parametrize("out_features", [192, 6, 7])
def test_few_row_linear_equals_f_linear(lead, out_features, monkeypatch):
    """The row-block product of a few fp32 rows (decoding) gives F.linear's values, bias
    included, for 8, 2 or 1 (indivisible) blocks, and is really taken up to FEW_ROWS rows
    (8 here, as on the CPUs where it pays)."""
    from minipt import fast
    monkeypatch.setattr(fast, "FEW_ROWS", 8)
    x, w, b = (rand(*lead, 24, dtype=torch.float32, seed=12),
               rand(out_features, 24, dtype=torch.float32, seed=13),
               rand(out_features, dtype=torch.float32, seed=14))
    calls = []
    monkeypatch.setattr(fast.torch, "bmm", lambda *a: calls.append(1) or torch.matmul(*a))
    with torch.no_grad():
        ours, ref = fast.linear(x, w, b), F.linear(x, w, b)
    assert ours.shape == ref.shape and (ours - ref).abs().max() <= TOL[torch.float32] * ref.abs().max()
    rows = x.numel() // 24
    assert len(calls) == (rows <= fast.FEW_ROWS and out_features % 2 == 0)


def test_unpadded_pad_keeps_only_the_index_for_backward():
    """Padding the packed tokens back to (B, T) puts them where `index` says, zeros
    elsewhere, and the gradient flows back to them; backward keeps the index, not x."""
    from minipt.fast import Unpadded
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    x = rand(5, 4, dtype=torch.float32, seed=15)
    unpadded = Unpadded(mask.flatten().nonzero().squeeze(1), 2, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        padded = unpadded.pad(x)
    assert torch.equal(padded[mask], x) and not padded[~mask].any()
    assert all(t.dtype == torch.long for t in saved)
    (grad,) = torch.autograd.grad(padded, x, torch.arange(24.0).view(2, 3, 4))
    assert torch.equal(grad, torch.arange(24.0).view(6, 4)[1:])


def test_unpad_backward_stores_the_gradient_rows_back():
    """Unpadded.unpad's backward (a plain store, for an index without repeats) gives the
    gradient autograd gives x[index]: the rows' gradients in place, zeros at the padding."""
    from minipt.fast import Unpadded
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    unpadded = Unpadded(mask.flatten().nonzero().squeeze(1), 2, 3)
    x = rand(2, 3, 4, dtype=torch.float32, seed=16).requires_grad_(True)
    g = rand(4, 4, dtype=torch.float32, seed=17)
    (ours,) = torch.autograd.grad(unpadded.unpad(x), x, g)
    (ref,) = torch.autograd.grad(x.flatten(0, 1)[unpadded.index], x, g)
    assert torch.equal(ours, ref) and not ours[~mask].any()
