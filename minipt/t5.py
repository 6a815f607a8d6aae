"""Encoder-decoder transformer: T5 v1.0 and T5 v1.1 / Flan-T5, chosen by config.

The encoder reads the input with bidirectional attention; the decoder writes the output
one token at a time, attending causally to itself and fully to the encoder's states
(cross-attention). T5 has no absolute positions: each stack learns one scalar per head for
every bucket of relative distance, computed once per forward and added to the attention
logits of all its layers. Attention logits are not scaled by 1/sqrt(d) (the scale is folded
into the initialisation), and no projection has a bias.

v1.0 uses a ReLU feed-forward and shares the embedding with the LM head (rescaling the
decoder output by d_model**-0.5 first); v1.1 and Flan-T5 use a gated-GELU feed-forward
and a separate LM head.

Like `gpt.py`, the model owns its KV cache and takes the two prompt hooks: encoder
`inputs_embeds` (soft prompts) and per-layer `LayerPrefix`es in each of the three kinds of
attention (encoder self, decoder self, cross).

References: Raffel et al. 2020, *Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer* (T5); Shazeer 2020, *GLU Variants Improve Transformer* (gated
GELU of T5 v1.1); Chung et al. 2022, *Scaling Instruction-Finetuned Language Models* (Flan-T5).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import T5Config
from .fast import linear
from .layers import KVCache, Linear, RMSNorm, attend


class RelativePositionBias(nn.Module):
    """One learned scalar per head for each bucket of relative distance (key - query).

    Distances below half the buckets get a bucket each; larger ones share log-spaced
    buckets up to max_distance, beyond which they all fall into the last one. The encoder
    splits its buckets between keys before and after the query; the decoder only ever
    looks back, so it spends all of them on the past.
    """

    def __init__(self, n_buckets: int, max_distance: int, n_head: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_head))

    def bucket(self, rel):
        n = self.n_buckets
        offset = torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            offset = (rel > 0).long() * n                   # keys after the query use the upper half
            dist = rel.abs()
        else:
            dist = (-rel).clamp(min=0)                      # future keys (masked anyway) count as 0
        exact = n // 2
        log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
        return offset + torch.where(dist < exact, dist, far)

    def forward(self, q_start: int, T: int, S: int):
        """Bias for queries at positions q_start..q_start+T over keys 0..S: (1, nh, T, S)."""
        device = self.weight.device
        q_pos = torch.arange(q_start, q_start + T, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        bias = self.weight[self.bucket(k_pos - q_pos)]     # (T, S, nh)
        return bias.permute(2, 0, 1)[None]


class Attention(nn.Module):
    """Multi-head attention without biases or 1/sqrt(d) scaling. Self-attention when
    `source` is None, cross-attention over `source` (the encoder output) otherwise."""

    def __init__(self, d_model: int, n_head: int, d_kv: int):
        super().__init__()
        self.n_head, self.d_kv = n_head, d_kv
        self.q_proj = Linear(d_model, n_head * d_kv, bias=False)
        self.k_proj = Linear(d_model, n_head * d_kv, bias=False)
        self.v_proj = Linear(d_model, n_head * d_kv, bias=False)
        self.o_proj = Linear(n_head * d_kv, d_model, bias=False)
        self.cache: "KVCache | None" = None  # decoder self-attention during generation
        self.source_kv = None                # cross-attention keys/values, fixed for a generation

    def heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_kv).transpose(1, 2)            # (B, nh, T, hs)

    def forward(self, x, mask, source=None, cache_pos=None, prefix=None):
        B, T, _ = x.shape
        q = self.heads(self.q_proj(x))                                          # (B, nh, T, hs)
        if source is None:
            k, v = self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
            if cache_pos is not None:
                k, v = self.cache.update(cache_pos, k, v)                       # (B, nh, S, hs)
        elif cache_pos is None or cache_pos == 0:
            k, v = self.heads(self.k_proj(source)), self.heads(self.v_proj(source))  # (B, nh, S, hs)
            if cache_pos == 0:
                self.source_kv = (k, v)
        elif self.source_kv is None:
            raise RuntimeError("cross-attention: cache_pos > 0 but nothing cached "
                               "(start decoding at cache_pos=0)")
        else:
            k, v = self.source_kv
        y = attend(q, k, v, mask, prefix, scale=1.0)                            # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class ReluFF(nn.Module):
    """T5 v1.0 feed-forward: out(relu(in(x)))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.in_proj = Linear(d_model, d_ff, bias=False)
        self.out_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.out_proj(F.relu(self.in_proj(x)))


class GatedGeluFF(nn.Module):
    """T5 v1.1 / Flan-T5 feed-forward: down(gelu(gate(x)) * up(x)), GELU in its tanh form."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=False)
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def feed_forward(cfg: T5Config):
    return GatedGeluFF(cfg.d_model, cfg.d_ff) if cfg.ff == "gated-gelu" else ReluFF(cfg.d_model, cfg.d_ff)


class EncoderBlock(nn.Module):
    """x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.d_kv)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = feed_forward(cfg)

    def forward(self, x, bias, prefix):
        x = x + self.attn(self.attn_norm(x), bias, prefix=prefix)
        return x + self.ff(self.ff_norm(x))


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + cross_attn(norm(x), encoder), then x + ff(norm(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_head, cfg.d_kv)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = Attention(cfg.d_model, cfg.n_head, cfg.d_kv)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff = feed_forward(cfg)

    def forward(self, x, bias, encoder_out, encoder_mask, cache_pos, self_prefix, cross_prefix):
        x = x + self.attn(self.attn_norm(x), bias, cache_pos=cache_pos, prefix=self_prefix)
        x = x + self.cross_attn(self.cross_norm(x), encoder_mask, encoder_out, cache_pos, cross_prefix)
        return x + self.ff(self.ff_norm(x))


class T5(nn.Module):
    extra_positions, n_members = 0, 1      # no prompt of its own (minipt.protocol.DecodingModel)

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = cfg = config
        if cfg.ff not in ("relu", "gated-gelu"):
            raise ValueError(f"unsupported T5Config: ff={cfg.ff!r} (expected 'relu' or 'gated-gelu')")
        # shared by encoder, decoder (and head if tied)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict(dict(
            rel_bias=RelativePositionBias(cfg.rel_buckets, cfg.rel_max_distance, cfg.n_head,
                                          bidirectional=True),
            layers=nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer)),
            norm=RMSNorm(cfg.d_model, cfg.norm_eps),
        ))
        self.decoder = nn.ModuleDict(dict(
            rel_bias=RelativePositionBias(cfg.rel_buckets, cfg.rel_max_distance, cfg.n_head,
                                          bidirectional=False),
            layers=nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layer)),
            norm=RMSNorm(cfg.d_model, cfg.norm_eps),
        ))
        # v1.0 reads logits off the embedding matrix itself, so there is no head to save
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False

    def tie_weights(self):
        """Nothing to re-tie: a tied head is the embedding itself (same interface as GPT)."""

    # ---- KV cache ----------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Allocate the decoder's self-attention cache for up to max_len output positions."""
        p = self.embed.weight
        for layer in self.decoder.layers:
            layer.attn.cache = KVCache(batch_size, self.config.n_head, max_len, self.config.d_kv,
                                       dtype or p.dtype, device or p.device)
            layer.cross_attn.source_kv = None

    def clear_cache(self):
        for layer in self.decoder.layers:
            layer.attn.cache = None
            layer.cross_attn.source_kv = None

    # ---- forward -----------------------------------------------------------------------

    def _run(self, layer, *args):
        if self.grad_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, prefixes=None):
        """
        input_ids: (B, S) token ids, or inputs_embeds: (B, S, C) instead (soft prompts go here).
        attention_mask: (B, S) 1 for real tokens, 0 for padding.
        prefixes: per-layer list of LayerPrefix (or None) for the encoder self-attention.
        Returns the encoder hidden states (B, S, C).
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds     # (B, S, C)
        S = x.size(1)
        bias = self.encoder.rel_bias(0, S, S).to(x.dtype)                         # (1, nh, S, S)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask, x.dtype)                   # (B, nh, S, S)
        prefixes = prefixes or [None] * len(self.encoder.layers)
        for layer, prefix in zip(self.encoder.layers, prefixes):
            x = self._run(layer, x, bias, prefix)
        return self.encoder.norm(x)

    def decode(self, decoder_input_ids, encoder_out, *, encoder_mask=None, cache_pos=None,
               self_prefixes=None, cross_prefixes=None, decoder_inputs_embeds=None):
        """
        decoder_input_ids: (B, T) output tokens so far, starting with decoder_start_id (or
            decoder_inputs_embeds: (B, T, C)); encoder_out: (B, S, C) from `encode`.
        encoder_mask: (B, S) the encoder's attention_mask, so padding is never attended.
        cache_pos: when set, this call's tokens sit at positions cache_pos.. and attend to
            everything cached before them (call setup_cache first). The cross-attention
            keys/values are computed from encoder_out at cache_pos == 0 and reused after.
        self_prefixes / cross_prefixes: per-layer lists of LayerPrefix (or None).
        Returns logits (B, T, V).
        """
        if cache_pos is not None and self.decoder.layers[0].attn.cache is None:
            raise RuntimeError("decode: cache_pos given but there is no cache (call setup_cache first)")
        # (B, T, C)
        x = self.embed(decoder_input_ids) if decoder_inputs_embeds is None else decoder_inputs_embeds
        T = x.size(1)
        start = cache_pos or 0
        bias = self.decoder.rel_bias(start, T, start + T).to(x.dtype)             # (1, nh, T, S)
        future = (torch.arange(start + T, device=x.device)
                  > torch.arange(start, start + T, device=x.device)[:, None])
        bias = bias.masked_fill(future, torch.finfo(x.dtype).min)
        cross_mask = None if encoder_mask is None else padding_bias(encoder_mask, x.dtype)  # (B, 1, 1, S_enc)
        n = len(self.decoder.layers)
        self_prefixes, cross_prefixes = self_prefixes or [None] * n, cross_prefixes or [None] * n
        for layer, sp, cp in zip(self.decoder.layers, self_prefixes, cross_prefixes):
            x = self._run(layer, x, bias, encoder_out, cross_mask, cache_pos, sp, cp)
        x = self.decoder.norm(x)
        if self.lm_head is None:
            return linear(x * self.config.d_model ** -0.5, self.embed.weight)    # (B, T, V)
        return self.lm_head(x)                                                    # (B, T, V)

    def forward(self, input_ids=None, decoder_input_ids=None, targets=None, *, inputs_embeds=None,
                attention_mask=None, prefixes=None, self_prefixes=None, cross_prefixes=None):
        """
        Encode the input, decode decoder_input_ids against it. targets: (B, T) labels for
        each decoder position, -100 where ignored; without decoder_input_ids the decoder
        reads the targets shifted right (teacher forcing). Returns (logits, loss); loss is
        None without targets.
        """
        if decoder_input_ids is None:
            if targets is None:
                raise ValueError("T5.forward: give decoder_input_ids or targets")
            decoder_input_ids = self.shift_right(targets)
        encoder_out = self.encode(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  prefixes=prefixes)
        logits = self.decode(decoder_input_ids, encoder_out, encoder_mask=attention_mask,
                             self_prefixes=self_prefixes, cross_prefixes=cross_prefixes)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def shift_right(self, targets):
        """Decoder inputs for teacher forcing: decoder_start_id, then the targets but the
        last; ignored (-100) labels become padding."""
        x = torch.full_like(targets, self.config.decoder_start_id)
        x[:, 1:] = targets[:, :-1]
        return x.masked_fill(x == -100, self.config.pad_id)


def padding_bias(attention_mask, dtype):
    """(B, S) 1/0 mask -> additive (B, 1, 1, S): 0 for real tokens, a huge negative for padding.
    The dtype's minimum rather than -inf keeps a fully padded row finite."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask.bool(), torch.finfo(dtype).min)[:, None, None, :]
