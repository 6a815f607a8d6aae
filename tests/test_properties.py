"""Property tests (hypothesis): invariants checked on drawn inputs rather than fixed cases.

1. Tokenizer round trips on random unicode, for every tokenizer minipt reads. Byte-level BPE
   is exact for every string; T5's sentencepiece normalises, so there the round trip gives
   the normal form (exact only for text already normal and inside the vocabulary).
2. Padding invariance: left padding a batch (with its attention mask) leaves the logits of
   the real tokens as they are alone, for GPT-2- and Llama-style decoders, bare or with any
   prompt method attached.
3. Mixed batches: a PromptBank batch with a drawn prompt per row (none, one, or "a+b+...")
   gives each row the logits it gets alone.

The real vocabularies come from minipt.fetch (cached in weights/downloads, fetched on first
use), as in test_tokenizer.py: a missing file is an error, never a skip.
"""
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_mixed import bank, prompt_files  # noqa: F401  (fixtures: five mixable prompt files, a bank of them)

from minipt.checkpoint import load_model
from minipt.config import GPTConfig
from minipt.fetch import fetch
from minipt.gpt import GPT
from minipt.prompts import METHODS, PromptConfig, attach, load
from minipt.prompts.mixed import MIXABLE
from minipt.tokenizer import BPETokenizer, SentencePieceTokenizer, _spell, load_tokenizer

# modest counts: the whole file runs in well under a minute on two cores
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def close(a, b) -> bool:
    """Equal up to float32 rounding (a few ulps of the largest logit): batching and padding
    change the order of sums, a bug changes the values."""
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()))


# ==== 1. tokenizer round trips ================================================================

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|endof", "<|im_start|"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x85", "\x0b", "\x1c", "\u200b"]


def mixed_text(specials=()):
    """Any unicode (no lone surrogates: those are not encodable text), interleaved with
    whitespace runs, digits and special-token text, where tokenizers have their edge cases."""
    piece = st.one_of(st.text(max_size=12), st.sampled_from(WHITESPACE),
                      st.from_regex(r"[0-9]{1,6}", fullmatch=True),
                      *([st.sampled_from(list(specials))] if specials else []))
    return st.lists(piece, max_size=8).map("".join)


@pytest.fixture(scope="module",
                params=["gpt2-files", "gpt2-tiktoken", "smollm2-gguf", "smollm2-tokenizer-json"])
def bpe(request, tmp_path_factory):
    """Every way minipt reads a byte-level BPE tokenizer."""
    if request.param == "gpt2-files":
        return BPETokenizer.from_gpt2_files(fetch("gpt2-encoder"), fetch("gpt2-vocab-bpe"))
    if request.param == "gpt2-tiktoken":
        return BPETokenizer.from_tiktoken(fetch("gpt2-tiktoken"))
    tok = BPETokenizer.from_gguf(fetch("smollm2-gguf"))
    if request.param == "smollm2-tokenizer-json":  # minipt's own tokenizer.json, read back
        folder = tmp_path_factory.mktemp("smollm2-tok")
        tok.save(folder)
        tok = load_tokenizer(folder)
    return tok


def missing_bytes(tok) -> set:
    return {b for b in range(256) if _spell(bytes([b])) not in tok.vocab}


def without_bytes(text: str, missing: set) -> str:
    return bytes(b for b in text.encode("utf-8") if b not in missing).decode("utf-8", errors="replace")


@given(text=mixed_text(BPE_SPECIALS))
@MANY
def test_bpe_round_trip(bpe, text):
    """Byte-level BPE spells text as UTF-8 bytes, so decode(encode(x)) == x exactly for every
    string when the vocabulary has all 256 bytes (GPT-2), special-token text matched as
    specials or encoded as plain text. SmolLM2's lacks 21 bytes; those are dropped, as HF
    tokenizers does, and what is left decodes with U+FFFD for the broken characters."""
    missing = missing_bytes(bpe)
    for allow_special in (True, False):
        ids = bpe.encode(text, allow_special=allow_special)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == without_bytes(text, missing)
    if not missing:
        assert bpe.decode(bpe.encode(text)) == text


def test_which_bytes_a_vocabulary_lacks(bpe):
    """Pins the two cases above: GPT-2 is exact; SmolLM2 drops 6 control characters' bytes and
    the lead bytes of planes 4-11 (0xF1, 0xF2), like HF tokenizers (ids checked against it)."""
    missing = missing_bytes(bpe)
    if bpe.vocab_size < 50000:  # SmolLM2
        assert missing == {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
        assert bpe.encode("!\x04!") == bpe.encode("!!") == [10095]  # dropped before merging
        assert bpe.encode("\U00040000") == [218, 218, 218] and bpe.decode([218, 218, 218]) == "\ufffd" * 3
    else:
        assert not missing


@pytest.fixture(scope="module")
def t5():
    return SentencePieceTokenizer(fetch("t5-spiece"))


def t5_normal_form(t5, text: str) -> str:
    """What T5 sees of text: sentencepiece's own normaliser (nmt_nfkc, a precompiled table), with
    its word marks as spaces. Measured over all of Unicode: NFKC (of an older Unicode; ~75 newer
    characters stay as they are), C0 controls but NUL/tab/LF/FF/CR, DEL, U+008F, U+009F dropped,
    and whitespace, U+200B-U+200F, U+FEFF, U+FFFD and U+2581 each a space, every run of spaces
    one, none at either end. `ascii_normal_form` spells out the ASCII part."""
    return t5.sp.normalize(text).replace("\u2581", " ").lstrip(" ")


def ascii_normal_form(text: str) -> str:
    """Tab, LF, FF and CR are spaces, the other controls but NUL and DEL go, runs of spaces are one."""
    kept = "".join(" " if c in "\t\n\x0c\r" else c for c in text
                   if " " <= c < "\x7f" or c in "\x00\t\n\x0c\r")
    return " ".join(w for w in kept.split(" ") if w)


# T5's 32k pieces hold these printable ASCII characters; '<\^`{}~' are not in it (-> <unk>)
T5_ASCII = "".join(c for c in map(chr, range(33, 127)) if c not in "<\\^`{}~")
T5_WORDS = st.text(alphabet=T5_ASCII + "éèàüößç", min_size=1, max_size=10)


@given(words=st.lists(T5_WORDS, min_size=1, max_size=8))
@FEW
def test_t5_round_trip_is_exact_for_normal_in_vocabulary_text(t5, words):
    text = " ".join(words)  # already normal: single spaces, none at the ends
    ids = t5.encode(text)
    assert ids[-1] == t5.eos_id and t5.unk_id not in ids
    assert t5.decode(ids) == text


@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
@MANY
def test_t5_normal_form_of_ascii(t5, text):
    assert t5_normal_form(t5, text) == ascii_normal_form(text)


# text that mostly stays inside the vocabulary, with what the normaliser rewrites
T5_NORMALISED = st.lists(st.one_of(
    T5_WORDS, st.sampled_from(WHITESPACE + ["\x00", "\x07", "\x1f", "\u2581", "\ufeff"]),
    st.sampled_from(["ﬁ", "ＡＢＣ", "１２３", "…", "½", "e\u0301", "Ⅻ", "™", "x²"])),
    max_size=10).map("".join)


@given(text=T5_NORMALISED)
@MANY
def test_t5_round_trip_gives_the_normal_form(t5, text):
    """Without out-of-vocabulary characters, decode(encode(x)) == t5_normal_form(x), and
    normal text round-trips exactly: the round trip is a projection onto normal text."""
    ids = t5.encode(text)
    assume(t5.unk_id not in ids)
    out = t5.decode(ids)
    assert out == t5_normal_form(t5, text)
    assert t5.decode(t5.encode(out)) == out


@given(text=mixed_text())
@MANY
def test_t5_round_trip_on_any_text(t5, text):
    """Any unicode: a character outside the 32k pieces comes back as ' ⁇ ' (<unk>), so only the
    rest survives: with the unk marks and spaces taken out, the output is a subsequence of the
    normal form (and equal to it when nothing was unknown)."""
    ids = t5.encode(text, allow_special=False)
    assert ids[-1] == t5.eos_id and all(0 <= i < t5.vocab_size for i in ids)
    out = t5.decode(ids)
    normal = t5_normal_form(t5, text)
    if t5.unk_id not in ids:
        assert out == normal
    kept = iter(normal.replace(" ", ""))
    assert all(c in kept for c in out.replace(" ⁇ ", "").replace(" ", ""))


SENTINELS = st.integers(0, 99).map(lambda n: f"<extra_id_{n}>")


@given(pieces=st.lists(T5_NORMALISED, min_size=1, max_size=4),
       sentinels=st.lists(SENTINELS, min_size=3, max_size=3))
@FEW
def test_t5_round_trip_with_sentinels(t5, pieces, sentinels):
    """Sentinels come back verbatim; the text between them in normal form, the text after a
    sentinel starting with a space (T5's word mark), the space before one lost."""
    text = pieces[0] + "".join(s + p for s, p in zip(sentinels, pieces[1:]))
    ids = t5.encode(text)
    assume(t5.unk_id not in ids)
    parts = re.split(r"(<extra_id_\d+>)", text)
    expected = t5_normal_form(t5, parts[0])
    for sentinel, piece in zip(parts[1::2], parts[2::2]):
        normal = t5_normal_form(t5, piece)
        expected += sentinel + (" " + normal if normal else "")
    assert t5.decode(ids) == expected


# ==== 2. padding invariance of the decoder's logits ==========================================

FAMILIES = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", qkv_bias=True, proj_bias=True,
                 tie_embeddings=True, n_kv_head=4, source="gpt2"),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, proj_bias=False,
                  tie_embeddings=False, n_kv_head=2, source="llama"),
}
PAD_METHODS = [None, *METHODS]
VOCAB = 100


@pytest.fixture(scope="module")
def decoders():
    """(family, method or None) -> a tiny random decoder, the method attached with weights
    far from their init (LoRA's B and the adapter gates start at zero)."""
    made = {}

    def get(family, method):
        if (family, method) not in made:
            torch.manual_seed(0)
            cfg = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, head_dim=8,
                            intermediate_size=48, max_seq_len=64, **FAMILIES[family])
            model = GPT(cfg)
            if method:
                model = attach(model, PromptConfig.for_method(method, num_virtual_tokens=3, init="random",
                                                              encoder_hidden=16, projection_hidden=24,
                                                              adapter_layers=2, lora_r=2))
                with torch.no_grad():
                    for p in model.method.parameters():
                        p.add_(torch.randn_like(p) * 0.5)
            made[family, method] = model.eval()
        return made[family, method]
    return get


def left_padded(rows, extra_pad, pad_values):
    """Rows of ids -> (B, T) ids left-padded with arbitrary ids, and the 1/0 mask."""
    T = max(map(len, rows)) + extra_pad
    ids = torch.tensor([[pad_values[(b + j) % len(pad_values)] for j in range(T - len(r))] + r
                        for b, r in enumerate(rows)])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


TOKEN_ROWS = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1, max_size=4)
PADDING = dict(extra_pad=st.integers(0, 3),
               pad_values=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3))


@pytest.mark.parametrize("method", PAD_METHODS, ids=lambda m: m or "bare")
@given(family=st.sampled_from(list(FAMILIES)), rows=TOKEN_ROWS, **PADDING)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@torch.no_grad()
def test_left_padding_leaves_the_real_tokens_logits_alone(decoders, family, method, rows, extra_pad,
                                                          pad_values):
    """Whatever the padding's length and ids, each row's real tokens get the logits they get
    with the row alone and unpadded: masks hide the pads, positions count real tokens only,
    and a prompt's virtual tokens go after the padding."""
    model = decoders(family, method)
    ids, mask = left_padded(rows, extra_pad, pad_values)
    logits, _ = model(ids, attention_mask=mask)
    for b, row in enumerate(rows):
        alone, _ = model(torch.tensor([row]))
        assert close(logits[b, -len(row):], alone[0]), (b, row)


# ==== 3. mixed-prompt batches ================================================================

BANK_NAMES = [*MIXABLE, "soft_b", "prefix_b", "lora_b"]   # the prompt files of test_mixed's fixture
ROW_SPEC = st.one_of(st.sampled_from([None, ""]), st.sampled_from(BANK_NAMES),
                     st.lists(st.sampled_from(BANK_NAMES), min_size=2, max_size=3)
                     .filter(lambda names: sum(n.startswith("lora") for n in names) <= 1)  # one LoRA a row
                     .map("+".join))


@pytest.fixture(scope="module")
def single_prompt_models(llama_dir, prompt_files):
    """name -> its prompt file loaded alone through PromptedModel (None -> the bare base)."""
    return {name: load(prompt_files[name], load_model(llama_dir)) if name else load_model(llama_dir)
            for name in [None, *BANK_NAMES]}


@given(rows=st.lists(st.tuples(ROW_SPEC, st.lists(st.integers(3, 119), min_size=1, max_size=9)),
                     min_size=1, max_size=5),
       pad=st.integers(0, 119))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@torch.no_grad()
def test_mixed_batch_rows_equal_each_row_alone(bank, single_prompt_models, rows, pad):
    """A drawn prompt per row (none, one, or a composition "a+b[+c]", repeats allowed) and
    ragged lengths: every row's logits are those of the row alone, unpadded: through its own
    prompt file (PromptedModel) for a single prompt, through the bank with a batch of one for
    a composition (test_mixed checks compositions against a joined prompt)."""
    specs, token_rows = [s for s, _ in rows], [r for _, r in rows]
    ids, mask = left_padded(token_rows, 0, [pad])
    logits, _ = bank(ids, rows=specs, attention_mask=mask)
    for b, (spec, row) in enumerate(rows):
        x = torch.tensor([row])
        if spec and "+" in spec:
            alone, _ = bank(x, rows=[spec])
        else:
            alone, _ = single_prompt_models[spec or None](x)
        assert close(logits[b, -len(row):], alone[0]), (b, spec, row)
