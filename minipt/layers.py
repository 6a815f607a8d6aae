"""Building blocks shared by both model families: norms, MLPs, rotary embeddings, the
static KV cache, and the attention layer with its prompt hook.

The prompt hook (`LayerPrefix`) is the second of the two places where every prompt method
plugs in (the first is the model's `inputs_embeds`): extra keys and values prepended in
an attention layer (prefix tuning, Li & Liang 2021; P-tuning v2, Liu et al. 2022), or
attended through a separate softmax scaled by a tanh gate (LLaMA-Adapter, Zhang et al. 2023).
"""
import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast


def device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors are: its first parameter's device, or its first buffer's
    (a quantized layer holds its weight as buffers of codes, minipt.quantized)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with no mean subtraction and no bias (Llama, T5).
    Computed in fp32 whatever the weight dtype, as the reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if fast.training(x, self.weight):
            return fast.RMSNormFunction.apply(x, self.weight, self.eps)
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), bit for bit, in one call instead of five
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys), or, for a few rows in decoding, the
    product from the 4-bit codes `packed.pack_for_decoding` may attach, or fast.linear's."""
    packed = None

    def forward(self, x):
        if self.packed is not None and self.packed.applies(x):
            return self.packed(x)
        return fast.linear(x, self.weight, self.bias)


def project(module, x, names):
    """[module.<name>(x) for name in names], as one product when `packed.pack_for_decoding` has
    stacked those layers' weights (and none has since been wrapped, by LoRA say)."""
    stacked = getattr(module, "packed_projections", None)
    if stacked is not None and stacked.applies(x) and all(type(getattr(module, n)) is Linear for n in names):
        return stacked(x).split(stacked.sizes, dim=-1)
    return [getattr(module, name)(x) for name in names]


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: up, GELU (tanh approximation), down."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama's gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    fusable_projections = ("gate_proj", "up_proj")

    def forward(self, x):
        gate, up = project(self, x, self.fusable_projections)
        if fast.training(gate, up):
            return self.down_proj(fast.SiluMulFunction.apply(gate, up))
        return self.down_proj(F.silu(gate) * up)


class GeGLU(SwiGLU):
    """Gemma's gated feed-forward: SwiGLU's layout with GELU (tanh approximation) as the gate."""

    def forward(self, x):
        gate, up = project(self, x, self.fusable_projections)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(dim) (Gemma), the factor rounded to the weight's dtype as
    the reference does. Only token ids are scaled: vectors given as embeddings (soft prompts)
    are taken to be in the scaled space already (see prompts.soft_prompt.embedding_scale); the
    tied LM head reads the unscaled weight."""

    def forward(self, idx):
        return super().forward(idx) * self.scale()

    def scale(self):
        return torch.tensor(self.embedding_dim ** 0.5, dtype=self.weight.dtype, device=self.weight.device)


def rope_cos_sin(positions, head_dim: int, base: float, dtype):
    """cos/sin tables for rotary embeddings at integer positions (B, T) -> (B, T, 1, hs), or
    (N,) -> (N, 1, hs) for unpadded tokens: they broadcast over the heads of (..., nh, hs).
    Frequencies in fp32 so long positions keep their precision."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq                 # (..., hs/2)
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]        # (..., 1, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hs/2) of each head by the position's angle (the "half" layout
    of the Hugging Face checkpoints; GGUF's interleaved layout is undone at conversion)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class LayerPrefix:
    """Extra keys/values for one attention layer, supplied by a prompt method.

    k, v: (B, n_kv_head, P, hs). Without a gate they are prepended to the layer's own
    keys, so every query attends to them in the same softmax (prefix tuning). With a gate
    (n_head,), or (B, n_head) in a mixed batch, they get their own softmax and are added as
    tanh(gate) * attention (LLaMA-Adapter): a zero gate leaves the output exactly unchanged.
    mask: optional (B, P) bool, False where a row has no prefix at that slot, so rows with
    prefixes of different lengths can share a batch.
    """
    k: torch.Tensor
    v: torch.Tensor
    mask: "torch.Tensor | None" = None
    gate: "torch.Tensor | None" = None


class KVCache:
    """Preallocated keys and values for incremental decoding. Writing in place avoids
    the re-allocation a growing torch.cat cache pays at every generated token. Not a module
    with buffers: torch.compile takes a module's buffers to be of fixed size, and would
    compile the decoding step again for every cache length (generation.compile_decoding)."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: int, k, v):
        """Store k, v (B, nkv, T, hs) at positions pos..pos+T; return all keys/values so far."""
        end = pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache overflow: {end} positions, cache holds {self.k.size(2)}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class Causal:
    """The keep-mask of a batch with no padding and no cached positions before it: plain
    causal, T x T. SDPA gets it as is_causal=True and no mask, the same attention bit for bit
    on CPU, and on CUDA the only way to its flash kernel (an explicit mask rules flash out);
    what needs the mask as a tensor (a joined prefix, fast.cpu_attention) reads `mask`."""
    mask: torch.Tensor                      # (1, 1, T, T) bool


def attend(q, k, v, mask, prefix, scale=None):
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, nkv, S, hs),
    plus the layer's prefix: a LayerPrefix, a list of them (mixed-prompt batches: at most
    one joined, any number gated), or None. `mask` is a bool (B, 1, T, S) keep-mask, an
    additive float bias, a Causal or None (every key); grouped-query heads are expanded
    inside SDPA."""
    prefixes = prefix_list(prefix)
    gqa = q.size(1) != k.size(1)
    for p in prefixes:
        if p.gate is None:
            mask = _extend_mask(mask, p, q, k.size(2))
            k = torch.cat([p.k.to(k.dtype), k], dim=2)
            v = torch.cat([p.v.to(v.dtype), v], dim=2)
    y = _sdpa(q, k, v, mask, scale, gqa)
    for p in prefixes:
        if p.gate is not None:
            pmask = None if p.mask is None else p.mask[:, None, None, :]
            ya = _sdpa(q, p.k.to(q.dtype), p.v.to(q.dtype), pmask, scale, gqa)
            gate = torch.tanh(p.gate).to(y.dtype)                     # (n_head,) or per row (B, n_head)
            y = y + gate.view(-1, gate.size(-1), 1, 1) * ya
    return y


def _sdpa(q, k, v, mask, scale, gqa):
    causal = isinstance(mask, Causal)
    y = fast.cpu_attention(q, k, v, mask.mask if causal else mask, scale) if fast.ENABLED else None
    if y is not None:
        return y
    if causal:
        mask = None
    elif mask is not None and gqa and q.device.type == "cuda":
        # CUDA's kernel for a mask (memory-efficient) takes no grouped heads, and with
        # enable_gqa SDPA would fall back to the math kernel: (B, nh, T, S) scores in memory
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=gqa)


def prefix_list(prefix) -> list:
    """A layer's prefix argument (None, one LayerPrefix, or a list of them) as a list."""
    return [] if prefix is None else prefix if isinstance(prefix, list) else [prefix]


def _extend_mask(mask, prefix: LayerPrefix, q, S: int):
    """Put the prefix's P columns in front of a (B|1, H|1, T, S) mask (bool keep-mask or
    additive float bias, or a Causal); no mask at all means "attend to everything"."""
    if isinstance(mask, Causal):
        mask = mask.mask
    B, _, T, _ = q.shape
    P = prefix.k.size(2)
    if mask is None and prefix.mask is None:
        return None
    keep = prefix.mask if prefix.mask is not None else torch.ones(B, P, dtype=torch.bool, device=q.device)
    if mask is None:
        mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    H = mask.size(1)
    pm = keep[:, None, None, :].expand(B, H, T, P)
    if mask.dtype != torch.bool:
        pm = torch.zeros(pm.shape, dtype=mask.dtype, device=q.device).masked_fill(~pm, float("-inf"))
    return torch.cat([pm, mask.expand(B, H, T, mask.size(-1))], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention for the decoder, with optional RoPE, grouped-query heads,
    a KV cache and a prompt prefix."""

    def __init__(self, n_embd, n_head, n_kv_head, head_dim, qkv_bias, out_bias, qk_norm_eps=None, scale=None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.scale = scale                      # None: 1/sqrt(head_dim)
        # Gemma 3 normalises each head of q and k (qk_norm_eps given)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.q_proj = Linear(n_embd, n_head * head_dim, bias=qkv_bias)
        self.k_proj = Linear(n_embd, n_kv_head * head_dim, bias=qkv_bias)
        self.v_proj = Linear(n_embd, n_kv_head * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_head * head_dim, n_embd, bias=out_bias)
        self.cache: "KVCache | None" = None

    fusable_projections = ("q_proj", "k_proj", "v_proj")

    def forward(self, x, mask, rope=None, cache_pos=None, prefix=None, unpadded=None):
        """x: (B, T, C); or packed tokens (shared + N, C) that `unpadded` (a fast.Unpadded) places."""
        lead = x.shape[:-1]
        q, k, v = project(self, x, self.fusable_projections)
        q = q.view(*lead, self.n_head, self.head_dim)                                # (B, T, nh, hs)
        k = k.view(*lead, self.n_kv_head, self.head_dim)                             # (B, T, nkv, hs)
        v = v.view(*lead, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if unpadded is not None:
            return self.o_proj(unpadded.attention(q, k, v, mask, prefix, self.scale).flatten(-2))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)            # (B, heads, T, hs)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)                                 # (B, nkv, S, hs)
        y = attend(q, k, v, mask, prefix, self.scale).transpose(1, 2)                 # (B, T, nh, hs)
        return self.o_proj(y.flatten(-2))
