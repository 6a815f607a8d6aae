"""Decoder-only transformer: GPT-2, the Llama family (SmolLM2, TinyLlama, Qwen2) and Gemma 3.

One model, read top to bottom; the config picks the parts that differ between the
families (norm, MLP, positions, biases; Gemma's embedding scale, q/k norms, post-norms and
sliding-window layers) once, at construction. The model owns its KV
cache, and its forward takes either token ids or embeddings plus optional per-layer
prefixes: the two hooks through which all prompt methods attach (see `layers.py`).

References: Radford et al. 2019 (GPT-2); Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE);
Ainslie et al. 2023 (grouped-query attention); Gemma Team 2025 (Gemma 3: local layers with a
sliding window and their own RoPE base, one global layer in six).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fast
from .config import GPTConfig
from .layers import (Causal, GeGLU, GeluMLP, KVCache, Linear, RMSNorm, ScaledEmbedding, SelfAttention, SwiGLU,
                     rope_cos_sin)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). Gemma 3 also
    norms each branch's output before adding it (post_norms; Identity elsewhere)."""

    def __init__(self, cfg: GPTConfig, sliding: bool = False):
        super().__init__()
        Norm = ((lambda d: RMSNorm(d, cfg.norm_eps)) if cfg.norm == "rmsnorm"
                else (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)))
        self.sliding = sliding                  # a local layer: sees the last sliding_window tokens
        self.attn_norm = Norm(cfg.n_embd)
        scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.attn = SelfAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.qkv_bias,
                                  cfg.proj_bias, cfg.norm_eps if cfg.qk_norm else None, scale)
        self.post_attn_norm = Norm(cfg.n_embd) if cfg.post_norms else nn.Identity()
        self.mlp_norm = Norm(cfg.n_embd)
        MLP = {"swiglu": SwiGLU, "geglu": GeGLU, "gelu": GeluMLP}[cfg.mlp]
        self.mlp = MLP(cfg.n_embd, cfg.intermediate_size, cfg.proj_bias)
        self.post_mlp_norm = Norm(cfg.n_embd) if cfg.post_norms else nn.Identity()

    def forward(self, x, mask, rope, cache_pos, prefix, unpadded=None):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), mask, rope, cache_pos, prefix, unpadded))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    extra_positions, n_members = 0, 1      # no prompt of its own (minipt.protocol.DecodingModel)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        if (cfg.norm not in ("layernorm", "rmsnorm") or cfg.mlp not in ("gelu", "swiglu", "geglu")
                or cfg.pos not in ("learned", "rope") or (cfg.sliding_window and cfg.pos != "rope")):
            raise ValueError(f"unsupported GPTConfig: norm={cfg.norm!r} mlp={cfg.mlp!r} pos={cfg.pos!r} "
                             f"sliding_window={cfg.sliding_window}")
        self.embed = (ScaledEmbedding if cfg.embed_scale else nn.Embedding)(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, cfg.sliding_window > 0 and (i + 1) % cfg.global_every != 0)
                                    for i in range(cfg.n_layer))
        self.norm = (RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm == "rmsnorm"
                     else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpointing = False
        self.compiled_layers = None

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def compile_layers(self):
        """torch.compile the blocks for training steps. A bf16 step on CPU spends a third of
        its time outside the matmuls, in norms, RoPE, SwiGLU and softmax, each a few passes
        over memory with a dispatch per op; the compiled block fuses them. The layers share
        the compiled code, and it serves every batch shape (dynamic); inference and the
        KV-cache path stay eager, so evaluation and generation compile nothing."""
        self.compiled_layers = [torch.compile(layer, dynamic=True) for layer in self.layers]

    # ---- KV cache ----------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Allocate a static KV cache for incremental decoding of up to max_len positions."""
        p = self.norm.weight                   # not the embedding's: a quantized one has no dense weight
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, self.config.n_kv_head, max_len, self.config.head_dim,
                                       dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.cache = None

    # ---- forward -----------------------------------------------------------------------

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, attention_mask=None,
                position_ids=None, prefixes=None, cache_pos=None, last_only=False, loss_only=False,
                shared=None):
        """
        idx: (B, T) token ids, or inputs_embeds: (B, T, C) instead (soft prompts go here).
        targets: (B, T) next-token labels aligned with the inputs, -100 where ignored.
        attention_mask: (B, S) 1 for real tokens, 0 for (left) padding, covering every
            position so far: S = T without a cache, cache_pos + T with one.
        position_ids: (B, T); by default counted over the real tokens of attention_mask,
            so left padding does not shift the positions of the text.
        prefixes: per-layer list of LayerPrefix (or None) from a prompt method.
        cache_pos: when set, keys/values are written to the cache at cache_pos.. and
            attention covers everything cached so far (call setup_cache first).
        last_only: compute logits for the last position only (generation).
        loss_only: with targets, apply the LM head only where a target is set and return
            (None, loss): in prompt tuning the head over every position can cost a fifth
            of the step, for logits nobody reads.
        shared: (P, C) embeddings of tokens that every row sees before its own (a soft
            prompt), without a cache. They come first and attention is causal, so their
            keys/values are the same in every row: they run once for the whole batch, at
            positions 0..P-1 (position_ids must count the text from P), packed with the
            rows' tokens, and every row attends to them as a prefix (see fast.Unpadded).
        Returns (logits, loss); loss is None without targets.
        """
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds     # (B, T, C)
        B, T, _ = x.shape
        start = cache_pos or 0
        if attention_mask is not None and start == 0 and bool(attention_mask.all()):
            # no row is padded: the mask says nothing, and without it attention is plain causal
            # (layers.Causal: SDPA's fast kernels on CUDA). Asked once per batch, at its first
            # forward (a host sync on a GPU); the decoding steps after it keep the mask given.
            attention_mask = None
        if position_ids is None:
            position_ids = self._positions(attention_mask, start, T, B, x.device)
        mask = self._mask(attention_mask, start, T, B, x.device)
        local_mask = self._window(mask, attention_mask, start, T, x.device, self.config.sliding_window)
        unpadded = None
        if cache_pos is None and (shared is not None or (fast.ENABLED and attention_mask is not None)):
            x, position_ids, unpadded = fast.Unpadded.pack(x, position_ids, attention_mask, shared)
        rope = local_rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        else:
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_base, x.dtype)
            if self.config.sliding_window:
                local_rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_local_base,
                                          x.dtype)
        prefixes = prefixes or [None] * len(self.layers)
        layers = self.layers
        if self.compiled_layers and self.training and torch.is_grad_enabled() and cache_pos is None:
            layers = self.compiled_layers
        for layer, plain, prefix in zip(layers, self.layers, prefixes):
            m, r = (local_mask, local_rope) if plain.sliding else (mask, rope)
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, m, r, cache_pos, prefix, unpadded, use_reentrant=False)
            else:
                x = layer(x, m, r, cache_pos, prefix, unpadded)
        x = self.norm(x)
        if unpadded is not None:
            x = unpadded.pad(x)                                              # (B, T, C)
        return self._head(x, targets, last_only, loss_only)

    def _head(self, x, targets, last_only, loss_only):
        """(logits, loss) from the final hidden states (B, T, C)."""
        if loss_only and targets is not None:
            keep = targets != -100                                           # (B, T)
            x, targets = x[keep], targets[keep]                              # (N, C), (N,)
            if type(self.lm_head) is Linear and fast.training(x, self.lm_head.weight):   # not wrapped, by LoRA say
                return None, fast.LinearCrossEntropy.apply(x, self.lm_head.weight, targets)
            return None, F.cross_entropy(self.lm_head(x).float(), targets)
        if last_only:
            # contiguous: F.linear on a strided (B, 1, C) broadcasts the weight into a bmm,
            # copying it B times (40 s for a batch of 32 on Qwen2.5's bf16 head, not 0.05 s)
            x = x[:, -1:].contiguous()
        logits = self.lm_head(x)                                             # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @staticmethod
    def _positions(attention_mask, start, T, B, device):
        if attention_mask is None:
            return torch.arange(start, start + T, device=device).expand(B, T)
        pos = attention_mask.long().cumsum(-1) - 1                          # (B, S): index among real tokens
        return pos[:, -T:].clamp(min=0)

    @staticmethod
    def _mask(attention_mask, start, T, B, device):
        """Bool keep-mask (B, 1, T, S): causal, minus padded keys. Each query may always see
        itself, so padding rows stay finite instead of softmaxing over nothing. Without
        padding or cached positions, a layers.Causal (T x T)."""
        if attention_mask is None and T == 1:
            return None                                                      # one new token sees all
        S = start + T
        q_pos = torch.arange(start, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        causal = k_pos <= q_pos                                              # (T, S)
        if attention_mask is None:
            return Causal(causal[None, None]) if start == 0 else causal[None, None]
        keep = causal[None] & attention_mask.bool()[:, None, :]             # (B, T, S)
        keep = keep | (k_pos == q_pos)[None]
        return keep[:, None]

    @staticmethod
    def _window(mask, attention_mask, start, T, device, window):
        """The local layers' keep-mask: `mask` minus the keys `window` or more tokens behind the
        query. Distances count real tokens (attention_mask), so neither left padding nor the
        empty prompt slots of a mixed batch bring a key nearer or push it away; per-layer prefixes
        stay visible (they have no position). None without a window."""
        if not window:
            return None
        if isinstance(mask, Causal):
            if T <= window:
                return mask                                                  # no key is that far back
            mask = mask.mask
        S = start + T
        if attention_mask is None:
            k_pos = torch.arange(S, device=device)[None]                     # (1, S)
        else:
            k_pos = attention_mask.long().cumsum(-1)                          # (B, S)
        near = (k_pos[:, -T:, None] - k_pos[:, None, :]) < window            # (B|1, T, S)
        return near[:, None] if mask is None else mask & near[:, None]
