"""Speed work, apart from the model code: what makes a CPU training step fast and small
and CPU decoding fast, each piece a drop-in for a plain formula in `layers.py`, which stays
its specification (`tests/test_fast.py` runs training steps both ways and compares).

One switch, `ENABLED` (on by default; `MINIPT_PLAIN=1` in the environment, or `with
fast.off():`, runs the plain code everywhere):
  - norms, SwiGLU and attention that keep only their inputs for backward and recompute the
    rest, which roughly halves a bf16 step's activations;
  - plain-matmul attention where PyTorch's CPU flash kernel has a slow backward, and for
    one 16-bit query in decoding;
  - unpadded batches: norms, projections and MLPs on the real tokens only, and a soft prompt
    that every row shares run once per batch (`Unpadded`, packed by GPT.forward);
  - the LM head and cross-entropy a chunk of rows at a time, never holding every logit;
  - few-row fp32 products as row blocks on CPUs where MKL runs them on one thread;
  - LoRA's update saving its input in the base's dtype, not an fp32 copy.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ENABLED = os.environ.get("MINIPT_PLAIN", "") in ("", "0")


@contextmanager
def off():
    """The plain path for the duration: what the fast one is tested against."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


def training(*tensors) -> bool:
    """Whether a memory-saving backward applies: the switch is on and autograd records one of these."""
    return ENABLED and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# Training memory: autograd would keep, for every norm, the fp32 copy of its input; for every
# SwiGLU, silu(gate) next to gate and up; for every attention, the scores in fp32 and bf16 and
# the grouped keys/values repeated per head. The three functions for them (the attention's
# is further down) keep only their inputs, in the model's dtype, and recompute the rest in
# backward, which roughly halves a bf16 training step's activations for a few percent more
# elementwise work.

class RMSNormFunction(torch.autograd.Function):
    """layers.RMSNorm's formula, saving x only; backward recomputes 1/rms(x) in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = xf * rstd
        g = (grad * weight).float()                                   # gradient w.r.t. the normed x
        dx = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (grad * normed.to(x.dtype)).sum_to_size(weight.shape)
        return dx.to(x.dtype), dweight, None


class SiluMulFunction(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (not silu(gate) as well). Backward does what
    autograd would, in the same order and dtype, recomputing silu(gate) once."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return d_gate, grad * F.silu(gate)


class TakeRows(torch.autograd.Function):
    """x[index] for an index without repeats. Autograd's backward of x[index] scatter-adds,
    since an index may repeat, and compiled that is an atomic add per element: the backward
    of the unpadding after attention made a compiled bf16 step ~4 % slower. Here the
    gradient rows are simply stored back."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.size(0)
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_put((index,), grad), None


@dataclass
class Unpadded:
    """The real tokens of a padded (B, T) batch, packed into one (N, ...) stack: `index`
    holds their places among the B*T flattened positions, in order.

    A training batch of varied lengths is a fifth padding or more (the sentiment task's:
    21 %). Norms, projections and MLPs treat every token alone, so they run on the N real
    tokens only; attention, which mixes tokens, puts them back in the (B, T) layout (`pad`),
    where the usual mask hides the zeros in the padding. GPT.forward packs the batch when the
    switch is on; each SelfAttention then calls `attention`.

    shared: that many tokens in front of the stack (shared + N in all) that every row sees
    before its own: a soft prompt run once for the whole batch (PromptedModel.forward). They
    attend causally among themselves; every row attends to their keys/values as a prefix.
    shared_mask: their (1, 1, shared, shared) causal keep-mask."""
    index: torch.Tensor
    B: int
    T: int
    shared: int = 0
    shared_mask: "torch.Tensor | None" = None

    @classmethod
    def pack(cls, x, position_ids, attention_mask, shared=None):
        """x (B, T, C) and position_ids (B, T) -> their real tokens (P + N, ...) with the shared
        tokens' P embeddings (P, C) in front at positions 0..P-1, and the Unpadded placing them."""
        B, T, _ = x.shape
        keep = attention_mask if attention_mask is not None else torch.ones(B, T, device=x.device)
        P = 0 if shared is None else shared.size(0)
        causal = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()[None, None] if P else None
        unpadded = cls(keep.flatten().nonzero().squeeze(1), B, T, P, causal)
        x, position_ids = unpadded.unpad(x), unpadded.unpad(position_ids)
        if P:
            x = torch.cat([shared.to(x.dtype), x])
            position_ids = torch.cat([torch.arange(P, device=x.device), position_ids])
        return x, position_ids, unpadded

    def pad(self, x):
        """(shared + N, ...) -> the rows' tokens (B, T, ...), zeros at the padding."""
        x, rest = x[self.shared:], x.shape[1:]
        # index_put, not index_copy: autograd keeps only the index for its backward, not x too
        return x.new_zeros(self.B * self.T, *rest).index_put((self.index,), x).view(self.B, self.T, *rest)

    def unpad(self, x):
        """(B, T, ...) -> (N, ...)."""
        return TakeRows.apply(x.flatten(0, 1), self.index)

    def attention(self, q, k, v, mask, prefix, scale=None):
        """layers.attend for packed, rotated q (shared + N, nh, hs), k, v (shared + N, nkv, hs)
        -> (shared + N, nh, hs)."""
        from .layers import LayerPrefix, attend, prefix_list   # layers imports this module
        shared_y = None
        if self.shared:
            # the shared tokens attend among themselves, and are every row's prefix
            P, B = self.shared, self.B
            # copies, so that what attention saves for backward does not hold all of q, k, v
            sq, sk, sv = (t[:P].transpose(0, 1)[None].contiguous() for t in (q, k, v))  # (1, heads, P, hs)
            shared_y = attend(sq, sk, sv, self.shared_mask, None, scale)[0].transpose(0, 1)  # (P, nh, hs)
            prefix = [LayerPrefix(sk.expand(B, -1, -1, -1), sv.expand(B, -1, -1, -1))] + prefix_list(prefix)
        q, k, v = (self.pad(t).transpose(1, 2) for t in (q, k, v))                   # (B, heads, T, hs)
        y = self.unpad(attend(q, k, v, mask, prefix, scale).transpose(1, 2))          # (N, nh, hs)
        return y if shared_y is None else torch.cat([shared_y, y])


# With a loss on every target token (summaries, chat turns) the LM head's logits are the
# biggest activation of a step: N x V in the model's dtype, an fp32 copy for the loss, and
# their gradient in both again, ~1 GB for 1,024 tokens of SmolLM2's 49,152-word vocabulary.
# The loss and its gradient need only each row's softmax, so they can be had a chunk of rows
# at a time, the gradient computed right away (Liger-Kernel's fused linear cross-entropy).
LOGITS_PER_CHUNK = 1 << 23            # ~32 MB of fp32 logits at a time


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(F.linear(x, weight).float(), targets), the mean over the N rows of x
    (N, C), targets (N,) all set (GPT._head's plain formula), and in the same pass its
    gradients, LOGITS_PER_CHUNK logits at a time: each chunk's logits go as soon as their
    gradient (softmax - one-hot) / N has been multiplied back. Rounded as autograd would:
    logits and their gradient in the model's dtype for the products, softmax in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        N = x.size(0)
        rows = max(1, LOGITS_PER_CHUNK // weight.size(0))
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, N, rows):
            xs, ts = x[s:s + rows], targets[s:s + rows]
            logits = F.linear(xs, weight).float()                                  # (rows, V)
            # logsumexp written out, in place: its own would take two more passes over the logits
            top = logits.amax(-1, keepdim=True)
            picked = logits.gather(1, ts[:, None])
            grad = logits.sub_(top).exp_()
            total = grad.sum(-1, keepdim=True)
            loss += (top + total.log() - picked).sum()
            grad = grad.div_(total * N)                                            # softmax / N
            grad[torch.arange(len(ts), device=x.device), ts] -= 1 / N
            grad = grad.to(x.dtype)
            if dx is not None:
                dx[s:s + rows] = grad @ weight
            if dw is not None:
                dw += (grad.t() @ xs).float()
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return loss / N

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad.to(dx.dtype),
                None if dw is None else (dw * grad).to(ctx.weight_dtype), None)


# PyTorch's CPU flash-attention backward is slow on short sequences: for a training batch of
# 16 x 70 tokens (SmolLM2 heads) forward + backward takes ~30 ms against ~9 ms for plain
# softmax(QK^T)V, a quarter of the whole step. Taken a block of queries at a time, each
# block over the keys its mask lets it see, the plain formula also beats it on long ones:
# a causal mask leaves about half the scores out, and a block's scores stay in the cache
# (fwd + bwd of one SmolLM2 layer, bf16, 2 threads of an AMD EPYC: 4 x 512 tokens, SDPA
# 141 ms, all queries at once 130 ms, blocks of 32 30 ms; 16 x 70 tokens 9.2 and 5.7 ms).
QUERY_BLOCK = 32


def cpu_attention(q, k, v, mask, scale):
    """layers.attend's softmax(q k^T) v the faster way on a CPU, or None where SDPA is best."""
    if q.device.type != "cpu":
        return None
    scale = q.size(-1) ** -0.5 if scale is None else scale
    if torch.is_grad_enabled():
        return ExplicitAttention.apply(q, k, v, mask, scale)
    if q.size(2) == 1 and q.dtype in (torch.float16, torch.bfloat16):
        # one query (decoding) in 16 bits: SDPA's CPU kernel takes 2-3x as long as this
        return _grouped_matmul(_block_scores(q * scale, k, mask, 0).softmax(-1).to(q.dtype), v, q.shape)
    return None


def _query_blocks(mask, T, S):
    """(start, end, lo, keys) per block of QUERY_BLOCK queries: the block's queries see none of
    the keys from `keys` on, and all of those before `lo` (a keep-mask says so; a bias or no
    mask: lo = keys = S). One block in a compiled step: the mask scan's sizes are
    data-dependent, a graph break per layer."""
    if torch.compiler.is_compiling():
        return [(0, T, 0, S)]
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end, lo, keys = min(start + QUERY_BLOCK, T), S, S
        if mask is not None and mask.dtype == torch.bool and mask.size(-2) == T:
            block = mask[..., start:end, :].reshape(-1, S)
            seen = block.any(0).nonzero()
            keys = int(seen[-1]) + 1 if len(seen) else 1
            hidden = (~block[:, :keys]).any(0).nonzero()
            lo = int(hidden[0]) if len(hidden) else keys
        elif mask is not None and mask.dtype == torch.bool:
            lo = 0
        blocks.append((start, end, lo, keys))
    return blocks


def _mask_block(mask, start, end, keys):
    if mask is None:
        return None
    return mask[..., :keys] if mask.size(-2) == 1 else mask[..., start:end, :keys]


def _block_scores(qs, k, mask, lo):
    """A block's scores (q * scale) k^T + mask in fp32, (B, nkv, groups, Tb, n), the query heads
    that share a kv head stacked as extra rows of one matmul instead of repeating the keys. The
    scale goes on q (the smaller operand; exact for the power-of-two scales of 64- and 256-wide
    heads), and a keep-mask's -inf is filled in place, only from column lo on: a causal block
    hides nothing left of its diagonal."""
    B, H, Tb, hs = qs.shape
    nkv, n = k.size(1), k.size(2)
    scores = (qs.reshape(B, nkv, H // nkv * Tb, hs) @ k.transpose(-1, -2)).float().view(B, nkv, H // nkv, Tb, n)
    if mask is None:
        return scores
    mask = mask.view(mask.size(0), -1, 1, *mask.shape[-2:]) if mask.size(1) == 1 else \
        mask.view(mask.size(0), nkv, H // nkv, *mask.shape[-2:])
    if mask.dtype != torch.bool:
        return scores + mask
    if lo < n:
        scores[..., lo:].masked_fill_(~mask[..., lo:], float("-inf"))
    return scores


class ExplicitAttention(torch.autograd.Function):
    """SDPA's semantics written out (softmax in fp32, grouped kv heads), a block of queries
    at a time over the keys it sees (_query_blocks), saving only q, k, v and the mask:
    backward recomputes each block's probabilities, as flash attention does."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale = scale
        ctx.blocks = _query_blocks(mask, q.size(2), k.size(2))
        qs = q * scale if scale != 1 else q
        out = []
        for start, end, lo, keys in ctx.blocks:
            qb = qs[:, :, start:end]
            probs = _block_scores(qb, k[:, :, :keys], _mask_block(mask, start, end, keys), lo).softmax(-1)
            out.append(_grouped_matmul(probs.to(q.dtype), v[:, :, :keys], qb.shape))
        return out[0] if len(out) == 1 else torch.cat(out, 2)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        B, H, T, hs = q.shape
        nkv, S = k.size(1), k.size(2)
        qs = q * ctx.scale if ctx.scale != 1 else q
        dq = torch.empty_like(q)
        if len(ctx.blocks) > 1:                                               # summed over the blocks
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        # a trained additive bias (T5, full FT)
        dmask = torch.zeros(B, H, T, S, device=q.device) if ctx.needs_input_grad[3] else None
        for start, end, lo, n in ctx.blocks:
            Tb = end - start
            qb, kb, vb = qs[:, :, start:end], k[:, :, :n], v[:, :, :n]
            scores = _block_scores(qb, kb, _mask_block(mask, start, end, n), lo)
            probs = scores.softmax(-1)                                             # (B, nkv, g, Tb, n)
            p = probs.to(q.dtype).view(B, nkv, -1, n)                             # (B, nkv, g*Tb, n)
            dy = grad[:, :, start:end].reshape(B, nkv, H // nkv * Tb, hs)
            dv_block = p.transpose(-1, -2) @ dy                                   # summed over the group
            dp = (dy @ vb.transpose(-1, -2)).float().view_as(probs)
            # softmax backward, probs * (dp - sum(dp * probs)), in one pass; the scale goes on
            # the (Tb, hs) products below rather than on the (Tb, n) scores
            dscores = torch._softmax_backward_data(dp, probs, -1, torch.float32)
            ds = dscores.to(q.dtype).view(B, nkv, -1, n)
            dq[:, :, start:end] = (ds @ kb).view(B, H, Tb, hs) * ctx.scale
            dk_block = ds.transpose(-1, -2) @ qb.reshape(B, nkv, -1, hs)
            if len(ctx.blocks) == 1:
                dk, dv = dk_block, dv_block
            else:
                dk[:, :, :n] += dk_block
                dv[:, :, :n] += dv_block
            if dmask is not None:
                dmask[:, :, start:end, :n] = dscores.view(B, H, Tb, n)
        if dmask is not None:
            dmask = dmask.sum_to_size(mask.shape).to(mask.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dmask, None


def _grouped_matmul(p, v, q_shape):
    """(B, nkv, g, T, S) probabilities times (B, nkv, S, hs) values -> (B, H, T, hs)."""
    B, nkv, g, T, S = p.shape
    return (p.view(B, nkv, g * T, S) @ v).view(q_shape)


# Decoding multiplies a few rows (one per sequence) by every weight matrix, so it is bound by
# reading the weights. On AMD CPUs MKL does such an fp32 product on one thread, at a third of
# the machine's memory bandwidth; cut into row blocks, the same product is a batched one, which
# torch spreads over the threads: the fp32 weight chain of SmolLM2 reads in ~25 ms instead of
# ~55 ms on 2 EPYC cores at 1 row, and still faster at 8 rows (a batch of 8). On Intel CPUs
# MKL's own product is threaded and reads at full bandwidth (17 ms), and the blocks would
# only slow it (45 ms), so there FEW_ROWS is 0. fp16/bf16 products keep F.linear.
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


FEW_ROWS = 8 if _cpu_vendor() == "AuthenticAMD" else 0


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), with the row-block product for a few fp32 rows on CPU."""
    rows = x.numel() // x.size(-1)
    blocks = 8 if weight.size(0) % 8 == 0 else 2 if weight.size(0) % 2 == 0 else 1
    if (not ENABLED or rows > FEW_ROWS or blocks == 1 or weight.dtype != torch.float32
            or x.device.type != "cpu"
            or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, -1).t().expand(blocks, -1, -1)                 # (blocks, in, rows)
    y = torch.bmm(weight.view(blocks, -1, weight.size(1)), xt)            # (blocks, out/blocks, rows)
    y = y.view(weight.size(0), rows).t().reshape(*x.shape[:-1], weight.size(0))
    return y if bias is None else y + bias


class LowRankUpdate(torch.autograd.Function):
    """LoRA's update, scale * B A x in the adapter's dtype (fp32), as autograd would compute
    it, but saving x in its own dtype: on a bf16 base autograd would keep x's fp32 copy, once
    per adapted projection (q and v read the same x), ~15 % of a LoRA step's activations. The
    cast is exact, so backward redoes it and gets the same bits."""

    @staticmethod
    def forward(ctx, x, A, B, scale):
        h = F.linear(x.to(A.dtype), A)                                          # (..., r)
        ctx.save_for_backward(x, h, A, B)
        ctx.scale = scale
        return F.linear(h, B) * scale                                           # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, h, A, B = ctx.saved_tensors
        g = grad * ctx.scale
        dh = g @ B                                                              # (..., r)
        dB = g.flatten(0, -2).t() @ h.flatten(0, -2)                            # (out, r)
        dA = dh.flatten(0, -2).t() @ x.to(A.dtype).flatten(0, -2)               # (r, in)
        dx = (dh @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dA, dB, None
