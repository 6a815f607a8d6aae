"""Checkpoint converters: a Hugging Face model directory (gpt2, llama, qwen2, gemma3_text, t5)
or a GGUF file of architecture llama, qwen2 or gemma3 -> a minipt checkpoint directory.

    python -m minipt.convert SRC OUT

OUT holds `config.json` (a minipt model config), `model.safetensors` and the tokenizer
files; from a GGUF file also `codes.safetensors`, its quantized tensors' own codes
(minipt.quantized, for training through a base kept in them). Weight names are translated
by declarative key maps: minipt key -> source key, with
`{i}` standing for the layer index. Every source key must be mapped or explicitly dropped,
every minipt key must be found with the expected shape, or the conversion stops with a
one-line error naming the key, and nothing is left at OUT.
"""
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import quantized
from .cli import ArgumentParser
from .config import GPTConfig, T5Config, save_config
from .progress import Progress
from .tensorfile import check_gguf, load_pickle, read_tensors


class ConversionError(ValueError):
    """A checkpoint that minipt does not understand; the message names the cause."""


@dataclass(frozen=True)
class Src:
    """Where a minipt tensor comes from: a source key, optionally transposed (GPT-2 stores
    its linear layers as Conv1D, (in, out)) and/or one of `parts` equal chunks along dim 0
    (GPT-2 fuses q, k, v into one c_attn), plus `offset` (Gemma's HF norms store weight - 1)."""
    key: str
    transpose: bool = False
    part: int = 0
    parts: int = 1
    offset: float = 0.0

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.offset:
            t = t + self.offset
        if self.transpose:
            t = t.t()
        if self.parts > 1:
            t = t.chunk(self.parts, dim=0)[self.part]
        return t.contiguous()


# ---- key maps (minipt key: source key) --------------------------------------------------

GPT2_KEYS = {
    "embed.weight": "wte.weight",
    "pos_embed.weight": "wpe.weight",
    "layers.{i}.attn_norm.weight": "h.{i}.ln_1.weight",
    "layers.{i}.attn_norm.bias": "h.{i}.ln_1.bias",
    **{f"layers.{{i}}.attn.{name}_proj.weight": Src("h.{i}.attn.c_attn.weight", True, n, 3)
       for n, name in enumerate("qkv")},
    **{f"layers.{{i}}.attn.{name}_proj.bias": Src("h.{i}.attn.c_attn.bias", False, n, 3)
       for n, name in enumerate("qkv")},
    "layers.{i}.attn.o_proj.weight": Src("h.{i}.attn.c_proj.weight", transpose=True),
    "layers.{i}.attn.o_proj.bias": "h.{i}.attn.c_proj.bias",
    "layers.{i}.mlp_norm.weight": "h.{i}.ln_2.weight",
    "layers.{i}.mlp_norm.bias": "h.{i}.ln_2.bias",
    "layers.{i}.mlp.up_proj.weight": Src("h.{i}.mlp.c_fc.weight", transpose=True),
    "layers.{i}.mlp.up_proj.bias": "h.{i}.mlp.c_fc.bias",
    "layers.{i}.mlp.down_proj.weight": Src("h.{i}.mlp.c_proj.weight", transpose=True),
    "layers.{i}.mlp.down_proj.bias": "h.{i}.mlp.c_proj.bias",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}
# causal-mask buffers; tied head
GPT2_DROPPED = ["h.{i}.attn.bias", "h.{i}.attn.masked_bias", "lm_head.weight"]

LLAMA_KEYS = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    **{f"layers.{{i}}.attn.{p}_proj.{w}": f"model.layers.{{i}}.self_attn.{p}_proj.{w}"
       for p in "qkvo" for w in ("weight", "bias")},
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{{i}}.mlp.{p}_proj.weight": f"model.layers.{{i}}.mlp.{p}_proj.weight"
       for p in ("gate", "up", "down")},
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_DROPPED = ["model.layers.{i}.self_attn.rotary_emb.inv_freq"]  # recomputed, not learned

# Gemma 3: HF's norms compute x * (1 + weight); minipt's RMSNorm multiplies by its weight, so
# the 1 is added here, once. HF's post_attention_layernorm is the attention output's norm
# (in Llama the name is the MLP's input norm).
_GEMMA_NORM = lambda key: Src(key, offset=1.0)
GEMMA3_KEYS = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{i}.attn_norm.weight": _GEMMA_NORM("model.layers.{i}.input_layernorm.weight"),
    **{f"layers.{{i}}.attn.{p}_proj.weight": f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"},
    "layers.{i}.attn.q_norm.weight": _GEMMA_NORM("model.layers.{i}.self_attn.q_norm.weight"),
    "layers.{i}.attn.k_norm.weight": _GEMMA_NORM("model.layers.{i}.self_attn.k_norm.weight"),
    "layers.{i}.post_attn_norm.weight": _GEMMA_NORM("model.layers.{i}.post_attention_layernorm.weight"),
    "layers.{i}.mlp_norm.weight": _GEMMA_NORM("model.layers.{i}.pre_feedforward_layernorm.weight"),
    "layers.{i}.post_mlp_norm.weight": _GEMMA_NORM("model.layers.{i}.post_feedforward_layernorm.weight"),
    **{f"layers.{{i}}.mlp.{p}_proj.weight": f"model.layers.{{i}}.mlp.{p}_proj.weight"
       for p in ("gate", "up", "down")},
    "norm.weight": _GEMMA_NORM("model.norm.weight"),
    "lm_head.weight": "lm_head.weight",
}

GGUF_KEYS = {
    "embed.weight": "token_embd.weight",
    "layers.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attn.v_proj.weight": "blk.{i}.attn_v.weight",
    **{f"layers.{{i}}.attn.{p}_proj.bias": f"blk.{{i}}.attn_{p}.bias" for p in "qkv"},  # qwen2
    "layers.{i}.attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.mlp_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    # gemma3 (llama.cpp stores its norms with the +1 already in)
    "layers.{i}.attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.post_attn_norm.weight": "blk.{i}.post_attention_norm.weight",
    "layers.{i}.post_mlp_norm.weight": "blk.{i}.post_ffw_norm.weight",
}
GGUF_DROPPED = []

# What differs between the GGUF architectures, all else being llama's layout under the
# metadata prefix "{arch}.": llama.cpp interleaves the rotary halves of llama's q/k rows
# (permuted_qk) but stores qwen2's and gemma3's as HF does, and qwen2 has q/k/v biases.
# gemma: the GPTConfig fields that make Gemma 3, with the values llama.cpp assumes when the
# file does not say (every 6th layer global, local RoPE base 1e4); the metadata keys win.
GGUF_ARCHS = {
    "llama": {"permuted_qk": True, "qkv_bias": False},
    "qwen2": {"permuted_qk": False, "qkv_bias": True},
    "gemma3": {"permuted_qk": False, "qkv_bias": False, "gemma": {"global_every": 6, "rope_local_base": 1e4}},
}


def _attention(ours: str, theirs: str) -> dict:
    return {f"{ours}.{p}_proj.weight": f"{theirs}.{p}.weight" for p in "qkvo"}


def _feed_forward(ours: str, theirs: str) -> dict:
    return {
        f"{ours}.in_proj.weight": f"{theirs}.wi.weight",      # v1.0, ReLU
        f"{ours}.out_proj.weight": f"{theirs}.wo.weight",
        f"{ours}.gate_proj.weight": f"{theirs}.wi_0.weight",  # v1.1, gated GELU
        f"{ours}.up_proj.weight": f"{theirs}.wi_1.weight",
        f"{ours}.down_proj.weight": f"{theirs}.wo.weight",
    }


# minipt key -> HF key; {i} is the layer index within its stack. Entries for parts a given
# config does not have (the other feed-forward, lm_head when tied) are simply not used.
T5_KEY_MAP: dict[str, str] = {
    "embed.weight": "shared.weight",
    "lm_head.weight": "lm_head.weight",
    # HF keeps each stack's relative position table in its block 0 only
    "encoder.rel_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "decoder.rel_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.norm.weight": "encoder.final_layer_norm.weight",
    "decoder.norm.weight": "decoder.final_layer_norm.weight",

    "encoder.layers.{i}.attn_norm.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    **_attention("encoder.layers.{i}.attn", "encoder.block.{i}.layer.0.SelfAttention"),
    "encoder.layers.{i}.ff_norm.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    **_feed_forward("encoder.layers.{i}.ff", "encoder.block.{i}.layer.1.DenseReluDense"),

    "decoder.layers.{i}.attn_norm.weight": "decoder.block.{i}.layer.0.layer_norm.weight",
    **_attention("decoder.layers.{i}.attn", "decoder.block.{i}.layer.0.SelfAttention"),
    "decoder.layers.{i}.cross_norm.weight": "decoder.block.{i}.layer.1.layer_norm.weight",
    **_attention("decoder.layers.{i}.cross_attn", "decoder.block.{i}.layer.1.EncDecAttention"),
    "decoder.layers.{i}.ff_norm.weight": "decoder.block.{i}.layer.2.layer_norm.weight",
    **_feed_forward("decoder.layers.{i}.ff", "decoder.block.{i}.layer.2.DenseReluDense"),
}

# HF keys known to carry nothing minipt needs.
T5_DROPPED: list[str] = [
    "encoder.embed_tokens.weight",  # copies of shared.weight
    "decoder.embed_tokens.weight",
    "lm_head.weight",               # when tied (v1.0): the same matrix as shared.weight
    # an unused table that older T5 checkpoints carry in the first cross-attention
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
]


def _expand(template: str, n: int) -> list[str]:
    return [template.format(i=i) for i in range(n)] if "{i}" in template else [template]


def _dropped_pattern(templates) -> re.Pattern:
    alts = [re.escape(t).replace(re.escape("{i}"), r"\d+") for t in templates] or ["(?!)"]
    return re.compile("^(?:" + "|".join(alts) + ")$")


def apply_key_map(src: dict, key_map: dict, dropped: list, expected: dict, n_layer: int) -> dict:
    """Translate a source state dict into minipt names.

    expected: minipt key -> shape, from the model built on the meta device; minipt keys
    that the model does not have (an absent bias, a tied head) are simply not looked up.
    """
    out, used = {}, set()
    for dst_t, rule in key_map.items():
        rule = Src(rule) if isinstance(rule, str) else rule
        for i in range(n_layer) if "{i}" in dst_t else [None]:
            dst = dst_t.format(i=i) if i is not None else dst_t
            if dst not in expected:
                continue
            key = rule.key.format(i=i) if i is not None else rule.key
            if key not in src:
                raise ConversionError(f"{key}: missing from the checkpoint (needed for {dst})")
            t = rule.take(src[key])
            if tuple(t.shape) != tuple(expected[dst]):
                raise ConversionError(f"{key}: shape {tuple(src[key].shape)}, "
                                      f"expected {tuple(expected[dst])} for {dst}")
            out[dst], used = t, used | {key}
    unmapped = sorted(expected.keys() - out.keys())
    if unmapped:  # a model parameter the key map has not caught up with
        raise ConversionError(f"{unmapped[0]}: minipt parameter with no entry in the key map")
    drop = _dropped_pattern(dropped)
    unknown = sorted(k for k in src if k not in used and not drop.match(k))
    if unknown:
        raise ConversionError(f"{unknown[0]}: unknown key in the checkpoint ({len(unknown)} unmapped)")
    return out


def expected_shapes(config) -> dict:
    """minipt key -> shape for a config, without allocating any weights."""
    from .checkpoint import build_model
    with torch.device("meta"):
        model = build_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


# ---- Hugging Face directories -------------------------------------------------------------

def _hf_get(hf: dict, key: str, default=None, required=True):
    if key in hf:
        return hf[key]
    if required and default is None:
        raise ConversionError(f"config.json: missing key {key!r}")
    return default


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConversionError(f"config.json: activation_function {act!r} not supported (gelu_new)")
        n_embd = _hf_get(hf, "n_embd")
        return GPTConfig(vocab_size=_hf_get(hf, "vocab_size"), n_layer=_hf_get(hf, "n_layer"),
                         n_head=_hf_get(hf, "n_head"), n_kv_head=_hf_get(hf, "n_head"), n_embd=n_embd,
                         head_dim=n_embd // _hf_get(hf, "n_head"),
                         intermediate_size=hf.get("n_inner") or 4 * n_embd,
                         max_seq_len=_hf_get(hf, "n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         source="gpt2")
    if kind == "gemma3_text":
        return _gemma3_config_from_hf(hf)
    # llama / qwen2
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r} not supported (silu)")
    rope = hf.get("rope_scaling") or {}
    params = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or params.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"config.json: rope scaling {rope_type!r} not supported")
    n_head = _hf_get(hf, "num_attention_heads")
    return GPTConfig(vocab_size=_hf_get(hf, "vocab_size"), n_layer=_hf_get(hf, "num_hidden_layers"),
                     n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                     n_embd=_hf_get(hf, "hidden_size"),
                     head_dim=hf.get("head_dim") or _hf_get(hf, "hidden_size") // n_head,
                     intermediate_size=_hf_get(hf, "intermediate_size"),
                     max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope",
                     rope_base=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
                     qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
                     proj_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "qwen2")),
                     source=kind)


def _gemma3_config_from_hf(hf: dict) -> GPTConfig:
    """Gemma 3's text config (transformers 4.5x writes rope_theta + rope_local_base_freq and
    sliding_window_pattern, 5.x rope_parameters per layer type and layer_types)."""
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConversionError(f"config.json: hidden_activation {hf['hidden_activation']!r} not supported")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ConversionError(f"config.json: {key} is not supported")
    params = hf.get("rope_parameters") or {}
    full, local = params.get("full_attention", {}), params.get("sliding_attention", {})
    for rope in (full, local, hf.get("rope_scaling") or {}):
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConversionError("config.json: rope scaling is not supported")
    types = hf.get("layer_types")
    n_layer = _hf_get(hf, "num_hidden_layers")
    every = (_global_every([t == "sliding_attention" for t in types], "config.json") if types
             else hf.get("sliding_window_pattern", 6))
    n_head, head_dim = _hf_get(hf, "num_attention_heads"), hf.get("head_dim", 256)
    return GPTConfig(vocab_size=_hf_get(hf, "vocab_size"), n_layer=n_layer, n_head=n_head,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=_hf_get(hf, "hidden_size"),
                     head_dim=head_dim, intermediate_size=_hf_get(hf, "intermediate_size"),
                     max_seq_len=hf.get("max_position_embeddings", 32768), norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="geglu", pos="rope",
                     rope_base=float(full.get("rope_theta", hf.get("rope_theta", 1e6))),
                     qkv_bias=bool(hf.get("attention_bias", False)), proj_bias=False,
                     tie_embeddings=bool(hf.get("tie_word_embeddings", True)), embed_scale=True, qk_norm=True,
                     post_norms=True, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", head_dim)),
                     sliding_window=_hf_get(hf, "sliding_window"), global_every=every,
                     rope_local_base=float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4))),
                     source="gemma3")


def t5_config_from_hf(hf: dict) -> T5Config:
    """Translate an HF T5 config.json (already parsed) into a T5Config."""
    def need(key):
        if key not in hf:
            raise ConversionError(f"config.json: {key}: missing")
        return hf[key]

    if hf.get("model_type", "t5") != "t5":
        raise ConversionError(f"config.json: model_type: expected 't5', got {hf['model_type']!r}")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise ConversionError(f"config.json: feed_forward_proj: {ff!r} is not supported "
                         "(expected 'relu' for T5 v1.0 or 'gated-gelu' for v1.1 / Flan-T5)")
    # transformers >= 5 writes tie_word_embeddings: true for every T5 and keeps the
    # v1.0 (tied head, rescaled output) vs v1.1 switch in scale_decoder_outputs
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    eos = hf.get("eos_token_id", 1)
    if not isinstance(eos, int):
        raise ConversionError(f"config.json: eos_token_id: expected one integer, got {eos!r}")
    pad = hf.get("pad_token_id", 0)
    n_layer = need("num_layers")
    return T5Config(
        vocab_size=need("vocab_size"), d_model=need("d_model"), d_kv=need("d_kv"), d_ff=need("d_ff"),
        n_layer=n_layer, n_decoder_layer=hf.get("num_decoder_layers") or n_layer, n_head=need("num_heads"),
        rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), ff=ff, tie_embeddings=bool(tied),
        pad_id=pad, eos_id=eos, decoder_start_id=hf.get("decoder_start_token_id", pad),
    )


def read_hf_weights(src: Path) -> dict:
    """All tensors of an HF directory: model.safetensors, sharded safetensors with their
    index (headers bounds-checked, see tensorfile.py), or a legacy pytorch_model.bin, loaded
    with weights_only=True: a pickle that holds anything but tensors is refused, not run."""
    single, index, legacy = (src / "model.safetensors", src / "model.safetensors.index.json",
                             src / "pytorch_model.bin")
    try:
        if single.exists():
            return read_tensors(single)
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_tensors(src / shard).items()}
        if legacy.exists():
            return load_pickle(legacy, mapped=True)
    except ValueError as e:  # tensorfile's one-line refusals name the file already
        raise ConversionError(str(e)) from None
    except (OSError, RuntimeError, json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"{src}: unreadable weights "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise ConversionError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _strip_prefix(sd: dict, prefix: str) -> dict:
    """GPT2LMHeadModel saves its body under 'transformer.', GPT2Model without it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def convert_hf(src: Path, out: Path) -> None:
    try:
        hf = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{src}: no config.json "
                              "(expected a Hugging Face model directory or a .gguf file)") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{src / 'config.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    kind = hf.get("model_type")
    if kind in ("gpt2", "llama", "qwen2", "gemma3_text"):
        config = gpt_config_from_hf(hf)
        key_map, dropped = {"gpt2": (GPT2_KEYS, GPT2_DROPPED), "gemma3_text": (GEMMA3_KEYS, [])}.get(
            kind, (LLAMA_KEYS, LLAMA_DROPPED))
        sd = read_hf_weights(src)
        if kind == "gpt2":
            sd = _strip_prefix(sd, "transformer.")
        if config.tie_embeddings:
            dropped = dropped + ["lm_head.weight"]
        n = config.n_layer
    elif kind == "t5":
        config, key_map, dropped = t5_config_from_hf(hf), T5_KEY_MAP, T5_DROPPED
        sd = read_hf_weights(src)
        n = max(config.n_layer, config.n_decoder_layer)
    else:
        raise ConversionError(f"{src / 'config.json'}: model_type {kind!r} not supported "
                              "(gpt2, llama, qwen2, gemma3_text, t5)")
    weights = apply_key_map(sd, key_map, dropped, expected_shapes(config), n)
    _write_checkpoint(out, config, weights, lambda d: _hf_tokenizer(src).save(d))


def _hf_tokenizer(src: Path):
    from .tokenizer import BPETokenizer, SentencePieceTokenizer, load_tokenizer
    if (src / "spiece.model").exists():
        return SentencePieceTokenizer(src / "spiece.model")
    if (src / "tokenizer.json").exists():  # byte-level BPE, or byte-fallback BPE (Gemma)
        return load_tokenizer(src / "tokenizer.json")
    if (src / "vocab.json").exists() and (src / "merges.txt").exists():
        return BPETokenizer.from_gpt2_files(src / "vocab.json", src / "merges.txt")
    raise ConversionError(f"{src}: no tokenizer (spiece.model, tokenizer.json or vocab.json + merges.txt)")


# ---- GGUF files ---------------------------------------------------------------------------

def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows with each head's two rotary halves interleaved; regroup
    them into the half-split layout that `layers.apply_rope` uses."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"}


def _global_every(pattern, where) -> int:
    """N for 'every Nth layer global', from N or from one flag per layer (True: sliding)."""
    if isinstance(pattern, int):
        return pattern
    sliding = [bool(p) for p in pattern]
    n = sliding.index(False) + 1 if False in sliding else len(sliding) + 1
    if sliding != [(i + 1) % n != 0 for i in range(len(sliding))]:
        raise ConversionError(f"{where}: sliding-window layer pattern {sliding} "
                              "is not 'every Nth layer global'")
    return n


def field_of(reader, name):
    f = reader.fields.get(name)
    return None if f is None else f.contents()


def convert_gguf(src: Path, out: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:  # the header is checked against the file before the gguf package maps any of it
        table = check_gguf(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    for name, kind, _ in table:
        if kind not in GGUF_TYPES:
            raise ConversionError(f"{src}: tensor {name!r}: GGUF type {kind} not supported "
                                  f"({', '.join(sorted(GGUF_TYPES))})")
    try:
        reader = GGUFReader(src)
    except Exception as e:  # the gguf package raises ValueError, struct errors, numpy errors...
        raise ConversionError(f"{src}: not a readable GGUF file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    arch = reader.fields.get("general.architecture")
    arch = arch.contents() if arch is not None else None
    if not isinstance(arch, str) or arch not in GGUF_ARCHS:
        raise ConversionError(f"{src}: GGUF architecture {arch!r} not supported ({', '.join(GGUF_ARCHS)})")

    def field(name, default=None):
        """Metadata `{arch}.name` (llama.cpp's names: llama.block_count, qwen2.block_count, ...)."""
        f = reader.fields.get(f"{arch}.{name}")
        if f is None:
            if default is None:
                raise ConversionError(f"{src}: missing GGUF metadata '{arch}.{name}'")
            return default
        return f.contents()

    n_head, n_embd = field("attention.head_count"), field("embedding_length")
    n_kv_head = field("attention.head_count_kv", n_head)
    permuted = GGUF_ARCHS[arch]["permuted_qk"]
    sd, codes = {}, {}
    progress = Progress(f"dequantizing {src.name}", unit="tensors")
    for i, t in enumerate(reader.tensors, 1):
        progress(i, len(reader.tensors))
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        permute = None
        if permuted and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if t.name.endswith("attn_q.weight") else n_kv_head
            permute = lambda x, h=heads: _unpermute(x, h)
        sd[t.name] = permute(w) if permute else w
        if t.tensor_type.name in quantized.GGUF_UNPACK:   # its codes too, for train.py --base_quant=gguf
            codes[t.name] = quantized.from_gguf_blocks(t.data, t.tensor_type.name, w.shape, permute)
    head_dim = field("attention.key_length", field("rope.dimension_count", n_embd // n_head))
    config = GPTConfig(
        vocab_size=(len(reader.fields["tokenizer.ggml.tokens"].data)
                    if "tokenizer.ggml.tokens" in reader.fields else field("vocab_size")),
        n_layer=field("block_count"), n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim,
        intermediate_size=field("feed_forward_length"), max_seq_len=field("context_length", 2048),
        norm="rmsnorm", norm_eps=float(field("attention.layer_norm_rms_epsilon")), mlp="swiglu", pos="rope",
        rope_base=float(field("rope.freq_base", 10000.0)), qkv_bias=GGUF_ARCHS[arch]["qkv_bias"],
        proj_bias=False, tie_embeddings="output.weight" not in sd, source=arch)
    gemma = GGUF_ARCHS[arch].get("gemma")
    if gemma:
        config = dataclasses.replace(
            config, mlp="geglu", embed_scale=True, qk_norm=True, post_norms=True,
            query_pre_attn_scalar=float(head_dim),  # llama.cpp's scale for all but the 27B
            sliding_window=field("attention.sliding_window"),
            global_every=_global_every(field("attention.sliding_window_pattern", gemma["global_every"]), src),
            rope_local_base=float(field("rope.freq_base_swa", gemma["rope_local_base"])))
    weights = apply_key_map(sd, GGUF_KEYS, GGUF_DROPPED, expected_shapes(config), config.n_layer)
    codes = {dst: codes[name] for dst, name in _key_names(GGUF_KEYS, config.n_layer).items()
             if dst in weights and name in codes}

    def save_tokenizer(d):
        from .tokenizer import BPETokenizer, SentencePieceBPE
        (SentencePieceBPE if field_of(reader, "tokenizer.ggml.model") == "llama" else BPETokenizer
         ).from_gguf(src).save(d)
    _write_checkpoint(out, config, weights, save_tokenizer, codes)


def _key_names(key_map: dict, n_layer: int) -> dict:
    """{minipt key: source key} of a key map of plain names, every layer spelled out."""
    return {dst: src for dst_t, src_t in key_map.items() for dst, src in
            zip(_expand(dst_t, n_layer), _expand(src_t if isinstance(src_t, str) else src_t.key, n_layer))}


# ---- output ---------------------------------------------------------------------------------

def _write_checkpoint(out: Path, config, weights: dict, save_tokenizer, codes=None) -> None:
    """Write into a temporary sibling directory, then rename: OUT appears complete or not at all.
    codes: {minipt key: QuantizedWeight} of a GGUF's quantized tensors, kept beside the weights."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_config(config, tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        if codes:
            quantized.save_codes(tmp / quantized.CODES_FILE, codes)
        save_tokenizer(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(src, out, force: bool = False) -> Path:
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConversionError(f"{out}: already exists (pass --force to replace it)")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConversionError(f"{src}: expected a .gguf file or a Hugging Face model directory")
        convert_gguf(src, out)
    else:
        convert_hf(src, out)
    return out


def main(argv=None):
    ap = ArgumentParser(prog="python -m minipt.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Hugging Face model directory or .gguf file")
    ap.add_argument("out", help="minipt checkpoint directory to create")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, args.force)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
