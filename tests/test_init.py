"""Every method starts at the base model's own behaviour (issue #19): at step 0 a prompt
initialised from tokens (init="vocab" here, "text" on SmolLM2) gives the logits the bare
base gives with those tokens as a hard prompt in front of the input; the adapter's prompts
are what its layers read for those tokens, behind a gate that keeps the output exact.
Fields a method does not read are refused."""
import pytest
import torch

from minipt.checkpoint import load_model
from minipt.train_config import parse_train_config
from minipt.prompts import PromptConfig, attach
from minipt.prompts.base import text_activations
from minipt.prompts.soft_prompt import initial_token_ids

P = 5


@pytest.fixture(scope="module")
def converted(converted_dir):
    return lambda kind: load_model(converted_dir(kind))


def start_ids(cfg, base, tokenizer=None):
    return initial_token_ids(cfg, tokenizer, base.config.vocab_size, cfg.num_virtual_tokens)


def left_padded(V=120):
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@torch.no_grad()
def assert_hard_prompt_equivalent(model, base, hard, ids, mask, atol=1e-5):
    """model(ids) == base(hard + ids) at the input's positions, row by row (left padding kept
    before the hard prompt, where a real prompt would go after it)."""
    logits, _ = model(ids, attention_mask=mask)
    for b in range(ids.size(0)):
        real = ids[b][mask[b].bool()]
        ref, _ = base(torch.cat([torch.tensor(hard), real])[None])
        torch.testing.assert_close(logits[b][mask[b].bool()], ref[0, len(hard):], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method, projection", [("prefix_tuning", True), ("prefix_tuning", False),
                                                ("p_tuning_v2", None), ("prompt_tuning", None),
                                                ("p_tuning", None)])
def test_step_0_is_the_base_with_the_tokens_as_a_hard_prompt(kind, method, projection, converted):
    base = converted(kind)
    extra = dict(prefix_projection=projection, projection_hidden=8) if method == "prefix_tuning" else {}
    cfg = PromptConfig(method=method, num_virtual_tokens=P, init="vocab", seed=3, **extra)
    model = attach(base, cfg)
    hard = start_ids(cfg, base)
    assert_hard_prompt_equivalent(model, base, hard, *left_padded())
    random = attach(base, PromptConfig(method=method, num_virtual_tokens=P, init="random", **extra))
    with pytest.raises(AssertionError):     # the test can tell a prompt that is not those tokens
        assert_hard_prompt_equivalent(random, base, hard, *left_padded())


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_gemma3_soft_prompt_takes_the_embedding_scale(method, converted):
    """Gemma scales token embeddings by sqrt(d_model) inside the embedding; a soft prompt from
    tokens is those tokens only with the scale in (past the 4-token window too). Prefixes are
    left out: they stay visible to the local layers, where hard tokens that far back are not."""
    base = converted("gemma3")
    cfg = PromptConfig(method=method, num_virtual_tokens=P, init="vocab", seed=3)
    assert_hard_prompt_equivalent(attach(base, cfg), base, start_ids(cfg, base), *left_padded())


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@torch.no_grad()
def test_t5_soft_prompt_and_p_tuning_are_the_hard_prompt(variant, converted):
    base = converted("t5-" + variant)
    ids = torch.randint(2, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    dec = torch.tensor([[0, 5, 9, 11]])
    for method in ("prompt_tuning", "p_tuning"):
        cfg = PromptConfig(method=method, num_virtual_tokens=P, init="vocab")
        hard = torch.tensor([start_ids(cfg, base)])
        logits, _ = attach(base, cfg)(ids, decoder_input_ids=dec)
        ref, _ = base(torch.cat([hard, ids], 1), dec)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
@torch.no_grad()
def test_t5_prefix_starts_at_the_words_keys_and_values(variant, converted):
    """T5's prefixes get no position bias, so no hard prompt equals them; they start at the
    keys/values the base computes for the tokens. Checked for the cross-attention site
    against the encoder's output projected by each layer."""
    base = converted("t5-" + variant)
    cfg = PromptConfig(method="p_tuning_v2", num_virtual_tokens=P, init="vocab")
    model = attach(base, cfg)
    enc = base.encode(torch.tensor([start_ids(cfg, base)]))[0]                   # (P, C)
    for layer, prefix in zip(base.decoder.layers, model.method.prefixes(1)["cross"]):
        k = layer.cross_attn.k_proj(enc).view(P, base.config.n_head, -1).transpose(0, 1)
        v = layer.cross_attn.v_proj(enc).view(P, base.config.n_head, -1).transpose(0, 1)
        torch.testing.assert_close(prefix.k[0], k)
        torch.testing.assert_close(prefix.v[0], v)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5-v1.1"])
@torch.no_grad()
def test_adapter_prompts_are_what_the_layers_read(kind, converted):
    base = converted(kind)
    cfg = PromptConfig(method="adapter", num_virtual_tokens=P, adapter_layers=2, init="vocab")
    model = attach(base, cfg)
    ids, mask = left_padded(100)
    if kind.startswith("t5"):
        kw = dict(decoder_input_ids=ids[:, :4])
        assert torch.equal(model(ids, **kw)[0], base(ids, **kw)[0])               # the zero gate
    else:
        assert torch.equal(model(ids, attention_mask=mask)[0], base(ids, attention_mask=mask)[0])
    site = "decoder" if kind.startswith("t5") else "self"
    if kind == "gpt2":  # learned positions: the KV cache holds the unrotated keys, an independent record
        hard = start_ids(cfg, base)
        base.setup_cache(1, P)
        base(torch.tensor([hard]), cache_pos=0)
        for block, prefix in zip(base.layers, model.method.prefixes(1)[site]):
            torch.testing.assert_close(prefix.k[0], block.attn.cache.k[0])
            torch.testing.assert_close(prefix.v[0], block.attn.cache.v[0])
        base.clear_cache()
    seen = text_activations(base, start_ids(cfg, base))[site]
    for (x, _, _), prompt in zip(seen, model.method.prompts):
        torch.testing.assert_close(prompt, x)


def test_smollm2_text_init_is_the_text_as_a_hard_prompt(smollm2_dir):
    """The real model and tokenizer, init="text": P-tuning v2 and the MLP prefix both start
    exactly where the base stands with the text in front of the input."""
    from minipt.checkpoint import load_base
    base, tok = load_base(smollm2_dir)
    text = "Classify the sentiment of this movie review as positive or negative."
    ids = [tok.encode("Review: a gripping, funny film\nSentiment:"), tok.encode("Review: dull\nSentiment:")]
    T = max(map(len, ids))
    batch = torch.tensor([[0] * (T - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
    for method in ("p_tuning_v2", "prefix_tuning"):
        cfg = PromptConfig(method=method, num_virtual_tokens=len(tok.encode(text)), init="text",
                           init_text=text)
        model = attach(base, cfg, tok)
        assert_hard_prompt_equivalent(model, base, tok.encode(text), batch, mask, atol=2e-4)


def test_fields_a_method_does_not_read_are_refused():
    with pytest.raises(ValueError, match="lora_r=4: prompt_tuning does not use it"):
        PromptConfig(method="prompt_tuning", lora_r=4)
    with pytest.raises(ValueError, match="init_text='x': it is read only with init=text"):
        PromptConfig(method="prefix_tuning", init="random", init_text="x")
    with pytest.raises(ValueError, match="init_labels=.*prefix_tuning does not use it"):
        PromptConfig(method="prefix_tuning", init_labels=[" a"])
    with pytest.raises(ValueError, match="adapter_layers=0: give the top k layers"):
        parse_train_config(["--method=adapter", "--adapter_layers=0"])
    with pytest.raises(ValueError, match="adapter_layers=3: lora does not use it"):
        parse_train_config(["--method=lora", "--adapter_layers=3"])
    # train.py's defaults (a text init) are no error for a method without one
    cfg = parse_train_config(["--method=lora"])
    assert PromptConfig(**cfg.method_fields()).init == "vocab"
    assert set(cfg.method_fields()) == {"method", "seed", "lora_r", "lora_alpha", "lora_dropout",
                                        "lora_targets"}


def test_each_method_has_its_recipe():
    from minipt.prompts.base import REGISTRY, method_class
    for method in REGISTRY:
        recipe = method_class(method).recipe(PromptConfig(method=method))
        cfg = parse_train_config([f"--method={method}"])
        assert cfg.lr == recipe["lr"] and cfg.warmup_steps == recipe["warmup_steps"]
    assert parse_train_config(["--method=adapter"]).adapter_layers == -2
    # the recipe follows the parameterisation, not the name: P-tuning v2 through an MLP is prefix tuning's
    assert parse_train_config(["--method=prefix_tuning"]).lr == 5e-4
    assert parse_train_config(["--method=p_tuning_v2", "--prefix_projection=true"]).lr == 5e-4
    assert parse_train_config(["--method=p_tuning_v2"]).lr == 1e-2
    assert parse_train_config(["--method=adapter", "--lr=0.1"]).lr == 0.1          # a given value wins
    assert parse_train_config(["--method=prompt_tuning"]).adapter_layers is None   # not read, not set


def test_adapter_all_but_the_lowest_layers(converted):
    model = attach(converted("llama"), PromptConfig(method="adapter", num_virtual_tokens=P, adapter_layers=-1,
                                                    init="random"))
    assert [p is None for p in model.method.prefixes(1)["self"]] == [True, False]


def test_a_prefix_file_from_before_the_anchor_loads(converted):
    """Files written before the MLP prefix had an anchor hold none: it loads as zeros."""
    model = attach(converted("llama"), PromptConfig(method="prefix_tuning", num_virtual_tokens=P,
                                                    projection_hidden=8))
    table = model.method.sites["self"]
    assert table.anchor.abs().max() > 0                                   # the activations of the tokens
    state = model.method.state_for_saving()
    del state["sites.self.anchor"]
    model.method.load_saved(state)
    assert torch.equal(table.anchor, torch.zeros_like(table.anchor))
