"""T5 parity with transformers on tiny random checkpoints (v1.0: ReLU, tied head; v1.1:
gated GELU, separate head), cached decoding, the prompt hooks, and the converter's
strictness."""
import json

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file

from minipt.config import T5Config
from minipt.checkpoint import load_model
from minipt.convert import (T5_DROPPED, T5_KEY_MAP, ConversionError, apply_key_map, convert, expected_shapes,
                            t5_config_from_hf)
from minipt.layers import LayerPrefix

from conftest import save_tiny_hf

V, D, NH, HS = 100, 32, 4, 8
TOL = 1e-4


def hf_t5(variant):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V, d_model=D, d_kv=HS, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=NH,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="relu" if variant == "v1.0" else "gated-gelu",
        tie_word_embeddings=variant == "v1.0", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:  # ones by default, which would hide a swapped norm
                p.uniform_(0.5, 1.5)
            if "relative_attention_bias" in name:  # large enough that a wrong bucket shows
                p.normal_(0.0, 1.0)
        if variant == "v1.1":
            # transformers 5 ties every T5 head to shared.weight; Flan-T5 has its own
            hf.lm_head.weight = nn.Parameter(torch.randn(V, D) * D ** -0.5)
    return hf


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def pair(request, tmp_path_factory):
    """(hf model, minipt model, hf state dict, hf config.json) via a save_pretrained directory."""
    hf = hf_t5(request.param)
    d = tmp_path_factory.mktemp(request.param)
    save_tiny_hf(hf, d / "hf")
    hf_sd = load_file(d / "hf" / "model.safetensors")
    hf_json = json.loads((d / "hf" / "config.json").read_text())
    convert(d / "hf", d / "minipt")
    model = load_model(d / "minipt")
    assert model.config.tie_embeddings == (request.param == "v1.0")
    return hf, model, hf_sd, hf_json


def t5_state_dict_from_hf(hf_sd, cfg):
    return apply_key_map(hf_sd, T5_KEY_MAP, T5_DROPPED, expected_shapes(cfg),
                         max(cfg.n_layer, cfg.n_decoder_layer))


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    dec = torch.randint(2, V, (3, 12), generator=g)
    dec[:, 0] = 0  # decoder_start_id
    return ids, mask, dec


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ---- parity with transformers ----------------------------------------------------------

@torch.no_grad()
def test_logits_match_hf(pair):
    hf, model, _, _ = pair
    ids, mask, dec = batch()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    logits, loss = model(ids, dec, attention_mask=mask)
    assert loss is None and logits.shape == (3, 12, V)
    assert maxdiff(logits, ref) <= TOL


@torch.no_grad()
def test_loss_matches_hf(pair):
    hf, model, _, _ = pair
    ids, mask, dec = batch()
    labels = dec.roll(-1, dims=1)
    labels[0, -3:] = -100
    labels[2, 5:] = -100
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    logits, loss = model(ids, targets=labels, attention_mask=mask)
    assert maxdiff(logits, ref.logits) <= TOL
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def greedy_cached(model, ids, mask, n_new, prefill=1, **prefixes):
    """Greedy decoding through the KV cache: `prefill` start tokens (decoder_start_id), then
    one token per call. Returns (tokens (B, prefill + n_new), logits of every call (B, ., V))."""
    B = ids.size(0)
    enc = model.encode(ids, attention_mask=mask)
    model.setup_cache(B, prefill + n_new)
    tokens = torch.full((B, prefill), model.config.decoder_start_id)
    step_logits, pos = [], 0
    for _ in range(n_new):
        new = tokens[:, pos:]
        logits = model.decode(new, enc, encoder_mask=mask, cache_pos=pos, **prefixes)
        step_logits.append(logits)
        pos += new.size(1)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.clear_cache()
    return tokens, torch.cat(step_logits, dim=1)


@torch.no_grad()
def test_cached_greedy_matches_full_decode_and_hf_generate(pair):
    hf, model, _, _ = pair
    ids, mask, _ = batch()
    n_new = 10
    tokens, step_logits = greedy_cached(model, ids, mask, n_new)
    full = model.decode(tokens[:, :-1], model.encode(ids, attention_mask=mask), encoder_mask=mask)
    assert maxdiff(step_logits, full) <= TOL

    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new)
    # generate pads a row after its eos (and stops once every row has one)
    done = (tokens == model.config.eos_id).long().cumsum(1).roll(1, dims=1)
    done[:, 0] = 0
    expected = tokens.masked_fill(done > 0, model.config.pad_id)
    assert torch.equal(ref, expected[:, :ref.size(1)])
    assert len(set(tokens[:, 1:].flatten().tolist())) > 1  # not a degenerate repeat


@torch.no_grad()
def test_cached_prefill_of_several_tokens(pair):
    _, model, _, _ = pair
    ids, mask, _ = batch()
    tokens, step_logits = greedy_cached(model, ids, mask, 5, prefill=3)
    full = model.decode(tokens[:, :-1], model.encode(ids, attention_mask=mask), encoder_mask=mask)
    assert maxdiff(step_logits, full) <= TOL


# ---- prompt hooks ----------------------------------------------------------------------

def prefix(B, P, gate=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerPrefix(torch.randn(B, NH, P, HS, generator=g), torch.randn(B, NH, P, HS, generator=g),
                       gate=gate)


def hooks(n_layers, make):
    return dict(prefixes=[make(i) for i in range(n_layers)],
                self_prefixes=[make(10 + i) for i in range(n_layers)],
                cross_prefixes=[make(20 + i) for i in range(n_layers)])


@torch.no_grad()
def test_empty_or_zero_gated_prefixes_leave_logits_unchanged(pair):
    _, model, _, _ = pair
    ids, mask, dec = batch()
    base, _ = model(ids, dec, attention_mask=mask)
    empty, _ = model(ids, dec, attention_mask=mask, **hooks(2, lambda s: prefix(3, 0, seed=s)))
    assert maxdiff(empty, base) <= 1e-6
    closed, _ = model(ids, dec, attention_mask=mask,
                      **hooks(2, lambda s: prefix(3, 4, torch.zeros(NH), seed=s)))
    assert maxdiff(closed, base) <= 1e-6
    # the same prefixes do change the output once they are live
    opened, _ = model(ids, dec, attention_mask=mask,
                      **hooks(2, lambda s: prefix(3, 4, torch.ones(NH), seed=s)))
    assert maxdiff(opened, base) > 1e-3
    prefixed, _ = model(ids, dec, attention_mask=mask, **hooks(2, lambda s: prefix(3, 4, seed=s)))
    assert maxdiff(prefixed, base) > 1e-3


@torch.no_grad()
def test_prefixes_work_with_the_cache(pair):
    _, model, _, _ = pair
    ids, mask, _ = batch()
    h = hooks(2, lambda s: prefix(3, 4, seed=s))
    enc_prefixes = h.pop("prefixes")
    enc = model.encode(ids, attention_mask=mask, prefixes=enc_prefixes)
    model.setup_cache(3, 8)
    tokens = torch.zeros(3, 1, dtype=torch.long)
    steps = []
    for pos in range(7):
        logits = model.decode(tokens[:, -1:], enc, encoder_mask=mask, cache_pos=pos, **h)
        steps.append(logits)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.clear_cache()
    full = model.decode(tokens[:, :-1], enc, encoder_mask=mask, **h)
    assert maxdiff(torch.cat(steps, dim=1), full) <= TOL


@torch.no_grad()
def test_inputs_embeds_equal_to_ids(pair):
    _, model, _, _ = pair
    ids, mask, dec = batch()
    base, _ = model(ids, dec, attention_mask=mask)
    via_embeds, _ = model(decoder_input_ids=dec, inputs_embeds=model.embed(ids), attention_mask=mask)
    assert maxdiff(via_embeds, base) <= 1e-6
    via_decoder_embeds = model.decode(None, model.encode(ids, attention_mask=mask), encoder_mask=mask,
                                      decoder_inputs_embeds=model.embed(dec))
    assert maxdiff(via_decoder_embeds, base) <= 1e-6


def test_grad_checkpointing_gives_the_same_gradients(pair):
    _, model, _, _ = pair
    ids, mask, dec = batch()
    k = torch.randn(3, NH, 2, HS, requires_grad=True)
    v = torch.randn(3, NH, 2, HS, requires_grad=True)
    prefixes = [LayerPrefix(k, v), None]
    model.train()
    try:
        grads = []
        for ckpt in (False, True):
            model.grad_checkpointing = ckpt
            _, loss = model(ids, targets=dec, attention_mask=mask, prefixes=prefixes, cross_prefixes=prefixes)
            grads.append(torch.autograd.grad(loss, [k, v, model.embed.weight]))
    finally:
        model.grad_checkpointing = False
        model.eval()
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        assert maxdiff(a, b) <= 1e-6


# ---- converter -------------------------------------------------------------------------

def test_converter_accepts_dropped_keys(pair):
    _, model, hf_sd, hf_json = pair
    sd = dict(hf_sd)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, NH)
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["shared.weight"]
    out = t5_state_dict_from_hf(sd, t5_config_from_hf(hf_json))
    assert out.keys() == model.state_dict().keys()


def test_converter_rejects_missing_unknown_and_misshaped(pair):
    _, model, hf_sd, hf_json = pair
    cfg = t5_config_from_hf(hf_json)

    key = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    sd = {k: v for k, v in hf_sd.items() if k != key}
    with pytest.raises(ConversionError, match=key):
        t5_state_dict_from_hf(sd, cfg)

    sd = {**hf_sd, "encoder.block.2.layer.0.SelfAttention.q.weight": torch.zeros(NH * HS, D)}
    with pytest.raises(ConversionError, match="encoder.block.2.layer.0.SelfAttention.q.weight"):
        t5_state_dict_from_hf(sd, cfg)

    # the other variant's feed-forward is unknown, not silently dropped
    other = "wi_0" if cfg.ff == "relu" else "wi"
    sd = {**hf_sd, f"encoder.block.0.layer.1.DenseReluDense.{other}.weight": torch.zeros(64, D)}
    with pytest.raises(ConversionError, match=f"DenseReluDense.{other}.weight"):
        t5_state_dict_from_hf(sd, cfg)

    key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    sd = {**hf_sd, key: torch.zeros(9, NH)}
    with pytest.raises(ConversionError, match=rf"{key}.*\(9, 4\).*\(8, 4\)"):
        t5_state_dict_from_hf(sd, cfg)

    if not cfg.tie_embeddings:
        sd = {k: v for k, v in hf_sd.items() if k != "lm_head.weight"}
        with pytest.raises(ConversionError, match="lm_head.weight"):
            t5_state_dict_from_hf(sd, cfg)


def test_config_from_hf():
    base = dict(model_type="t5", vocab_size=V, d_model=D, d_kv=HS, d_ff=64, num_layers=3, num_heads=NH,
                relative_attention_num_buckets=8, decoder_start_token_id=0)
    # t5-small's config.json (transformers 4 era): no tie_word_embeddings key means tied
    v10 = t5_config_from_hf({**base, "feed_forward_proj": "relu"})
    assert v10 == T5Config(vocab_size=V, d_model=D, d_kv=HS, d_ff=64, n_layer=3, n_decoder_layer=3, n_head=NH,
                           rel_buckets=8, rel_max_distance=128, ff="relu", tie_embeddings=True)
    # flan-t5's config.json says so explicitly; transformers 5 says it with scale_decoder_outputs
    flan = t5_config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                              "num_decoder_layers": 2})
    assert (flan.ff, flan.tie_embeddings, flan.n_decoder_layer) == ("gated-gelu", False, 2)
    v5 = t5_config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": True,
                            "scale_decoder_outputs": False})
    assert v5.tie_embeddings is False

    with pytest.raises(ValueError, match="config.json: feed_forward_proj"):
        t5_config_from_hf({**base, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="config.json: model_type"):
        t5_config_from_hf({**base, "model_type": "umt5"})
    with pytest.raises(ValueError, match="config.json: d_model"):
        t5_config_from_hf({k: v for k, v in base.items() if k != "d_model"})
