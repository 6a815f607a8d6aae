"""Draft converter (to be merged into `convert.py`): a Hugging Face T5 / Flan-T5 checkpoint
(`config.json` plus its state dict) to minipt's `T5`.

The key map is declarative, minipt name -> HF name, and strict: every tensor the model needs
must be in the checkpoint with the right shape, and every tensor in the checkpoint must be
either used or listed in `T5_DROPPED`.

Reference: Raffel et al. 2020 (T5); the HF layout numbers each block's sub-layers:
0 self-attention, then (decoder only) 1 cross-attention, then the feed-forward.
"""
import torch

from .config import T5Config
from .t5 import T5


def t5_config_from_hf(hf: dict) -> T5Config:
    """Translate an HF T5 config.json (already parsed) into a T5Config."""
    def need(key):
        if key not in hf:
            raise ValueError(f"config.json: {key}: missing")
        return hf[key]

    if hf.get("model_type", "t5") != "t5":
        raise ValueError(f"config.json: model_type: expected 't5', got {hf['model_type']!r}")
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in ("relu", "gated-gelu"):
        raise ValueError(f"config.json: feed_forward_proj: {ff!r} is not supported "
                         "(expected 'relu' for T5 v1.0 or 'gated-gelu' for v1.1 / Flan-T5)")
    # transformers >= 5 writes tie_word_embeddings: true for every T5 and keeps the
    # v1.0 (tied head, rescaled output) vs v1.1 switch in scale_decoder_outputs
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    eos = hf.get("eos_token_id", 1)
    if not isinstance(eos, int):
        raise ValueError(f"config.json: eos_token_id: expected one integer, got {eos!r}")
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


def t5_state_dict_from_hf(hf_sd: dict, cfg: T5Config) -> dict:
    """Rename an HF T5 state dict to minipt's names, checking names and shapes both ways.
    Returns a dict that `T5(cfg).load_state_dict(..., strict=True)` accepts."""
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: v.shape for k, v in T5(cfg).state_dict().items()}
    n_layers = {"encoder": cfg.n_layer, "decoder": cfg.n_decoder_layer}
    names = {}  # minipt key -> HF key, for this config
    for ours, theirs in T5_KEY_MAP.items():
        indices = range(n_layers[ours.split(".")[0]]) if "{i}" in ours else [0]
        for i in indices:
            if ours.format(i=i) in expected:
                names[ours.format(i=i)] = theirs.format(i=i)
    for key in expected.keys() - names.keys():
        raise KeyError(f"{key}: minipt parameter with no entry in T5_KEY_MAP")

    out = {}
    for ours, theirs in names.items():
        if theirs not in hf_sd:
            raise KeyError(f"{theirs}: missing from the checkpoint (needed for minipt {ours})")
        t = hf_sd[theirs]
        if tuple(t.shape) != tuple(expected[ours]):
            raise ValueError(f"{theirs}: expected shape {tuple(expected[ours])}, got {tuple(t.shape)}")
        out[ours] = t
    unknown = sorted(set(hf_sd) - set(names.values()) - set(T5_DROPPED))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise KeyError(f"{unknown[0]}: unknown key in the checkpoint{more}")
    return out
