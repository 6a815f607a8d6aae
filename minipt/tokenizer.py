"""Tokenizers: byte-level BPE and Gemma's sentencepiece-style BPE written out here, and
sentencepiece for T5.

`BPETokenizer` is the GPT-2 scheme (Radford et al. 2019, *Language Models are
Unsupervised Multitask Learners*, section 2.2): text is split into words by a regex,
each word becomes UTF-8 bytes spelled as printable characters, and learned merges
glue adjacent symbols together, lowest merge rank first. It reads GPT-2's
`encoder.json` + `vocab.bpe`, tiktoken rank files, HF `tokenizer.json` and the
`tokenizer.ggml.*` metadata of a GGUF file (SmolLM2, Qwen2), and writes an HF-compatible
`tokenizer.json`, so a minipt checkpoint directory also loads in `transformers`. Qwen2
splits words with its own regex and NFC-normalises the text first.

`SentencePieceBPE` is sentencepiece's BPE over a scored vocabulary with byte fallback, read
from a GGUF's `tokenizer.ggml.*` (Gemma 3) or the HF `tokenizer.json` it writes.

`SentencePieceTokenizer` wraps the `sentencepiece` library for T5 and adds T5's
100 sentinel tokens `<extra_id_N>` and its end-of-sequence token.

`load_tokenizer(path)` picks the right one for a checkpoint directory.
"""
import base64
import functools
import heapq
import json
import math
import re
import shutil
import unicodedata
from pathlib import Path

# --------------------------------------------------------------------------- bytes <-> characters


@functools.cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible table that gives each of the 256 bytes a visible character.

    Merges are stored as text, so every byte needs a printable stand-in: bytes that are
    already visible Latin-1 characters stand for themselves, the other 68 (controls, space,
    ...) are moved up to chr(256), chr(257), ... in byte order. That is why a space shows
    up as 'Ġ' (chr(288)) inside GPT-2 tokens.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)}
    table, moved = {}, 0
    for b in range(256):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


@functools.cache
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_char().items()}


def _spell(data: bytes) -> str:
    """Raw bytes -> the byte-level spelling used in vocabularies and merges."""
    table = _byte_to_char()
    return "".join(table[b] for b in data)


def _unspell(token: str) -> bytes:
    table = _char_to_byte()
    return bytes(table[c] for c in token)


# --------------------------------------------------------------------------- pre-tokenizer regex

# Unicode White_Space: what \s means in the regex engines behind GPT-2, tiktoken and HF
# tokenizers. Python's own \s is wider (it also matches \x1c-\x1f), so it is spelled out.
_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

# Letters and numbers all live in planes 0-3; planes 4-16 hold only tags, variation
# selectors and private use. Scanning just those planes keeps the one-off build cheap.
_SCAN_END = 0x40000


@functools.cache
def _letter_and_number_classes() -> tuple[str, str]:
    """Regex character classes for \\p{L} and \\p{N}, which Python's `re` lacks.

    Built once, on first use, from `unicodedata` (general categories L* and N*) as
    lists of code point ranges. Python's Unicode tables can be older than those of the
    Rust regex engine behind HF tokenizers; the two only disagree on recently added letters.
    """
    ranges = {"L": [], "N": []}
    for cp in range(_SCAN_END):
        kind = unicodedata.category(chr(cp))[0]
        if kind in ranges:
            spans = ranges[kind]
            if spans and spans[-1][1] == cp - 1:
                spans[-1][1] = cp
            else:
                spans.append([cp, cp])

    def as_class(spans):
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)

    return as_class(ranges["L"]), as_class(ranges["N"])


@functools.cache
def _word_regex() -> re.Pattern:
    r"""GPT-2's split: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

    A word keeps at most one leading space; `\s+(?!\S)` leaves the last space of a run
    for the next word, so "a  b" splits as "a", " ", " b".
    """
    L, N = _letter_and_number_classes()
    return re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d"
        rf"| ?[{L}]+| ?[{N}]+| ?[^{_SPACE}{L}{N}]+"
        rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
    )


# Qwen2's split as its tokenizer.json writes it (llama.cpp's 'qwen2' pre-tokenizer); the
# Python translation is _qwen2_regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.cache
def _qwen2_regex() -> re.Pattern:
    """Qwen2's split (QWEN2_SPLIT). Unlike GPT-2's: contractions in any case ('S, 'LL; like
    the Oniguruma engine behind HF, Python's case folding also lets 's match 'ſ), numbers
    one digit at a time, a letter run takes one leading character that is neither a letter,
    a digit nor a line break (' hello', '(hello', '_hello'), and punctuation keeps the line
    breaks after it ('):\n').
    """
    L, N = _letter_and_number_classes()
    return re.compile(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{_SPACE}{L}{N}]+[\r\n]*"
        rf"|[{_SPACE}]*[\r\n]+|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
    )


# the word regex of each pre-tokenizer, by name
_WORD_REGEXES = {"gpt2": _word_regex, "qwen2": _qwen2_regex}


@functools.cache
def _number_regex() -> re.Pattern:
    """One \\p{N} character, for the 'split every digit first' pre-tokenizers."""
    _, N = _letter_and_number_classes()
    return re.compile(f"([{N}])")


# --------------------------------------------------------------------------- the merge loop


def _bpe_merge(parts: list, rank) -> list:
    """Merge adjacent parts, lowest `rank(a, b)` first (leftmost on ties), until no pair
    has a finite rank. Works on str symbols and on bytes alike."""
    while len(parts) > 1:
        ranks = [rank(a, b) for a, b in zip(parts, parts[1:])]
        best = min(range(len(ranks)), key=ranks.__getitem__)
        if ranks[best] == math.inf:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover an ordered merge list from tiktoken's `token bytes -> rank` table.

    tiktoken has no merge list: a pair may merge when the joined bytes are a token, and
    lower-ranked tokens merge first. The token of rank r must be the join of the two
    parts that this same merging reaches on its own bytes using only tokens ranked below r.
    """
    merges = []
    for token, r in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue

        def rank_below_r(a, b):
            joined = ranks.get(a + b, math.inf)
            return joined if joined < r else math.inf

        parts = _bpe_merge([bytes([b]) for b in token], rank_below_r)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} of rank {r} is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _split_on(pattern: re.Pattern | None, text: str) -> list[tuple[str, bool]]:
    """Split text on special tokens: [(piece, is_special), ...] without empty pieces."""
    if pattern is None:
        return [(text, False)] if text else []
    # `pattern` has one capture group, so re.split alternates text, special, text, ...
    return [(piece, i % 2 == 1) for i, piece in enumerate(pattern.split(text)) if piece]


def _special_regex(tokens) -> re.Pattern | None:
    # Longest first, so "<|im_start|>" wins over any special that is a prefix of it.
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- byte-level BPE

# The default system turn written in a ChatML template: its text holds no quote or brace (that
# would be template code, not the message), and the newline may be written as a Jinja escape.
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")

# llama.cpp's token types that HF and llama.cpp match whole in text: CONTROL (<|endoftext|>,
# <|im_start|>, ...) and USER_DEFINED (Qwen2's <tool_call>)
_GGUF_SPECIAL_TYPES = (3, 4)

# tokenizer.ggml.pre -> how the text is split before BPE. 'smollm' cuts out every \p{N}
# character, then uses GPT-2's regex. 'qwen2' NFC-normalises as Qwen2's own tokenizer.json does
# (llama.cpp and transformers' GGUF reader skip that step; see tests/test_qwen2.py).
_GGUF_PRE = {
    "gpt2": {},
    "smollm": {"split_digits": True},
    "qwen2": {"pattern": "qwen2", "nfc": True},
}


class BPETokenizer:
    """Byte-level BPE (GPT-2, SmolLM2, Qwen2).

    vocab:          token in byte-level spelling -> id
    merges:         pairs of byte-level tokens, highest priority first
    special_tokens: literal text -> id, matched whole in the input before BPE
    split_digits:   isolate every \\p{N} character before the word regex (SmolLM2)
    pattern:        the word regex, "gpt2" or "qwen2"
    nfc:            NFC-normalise the text between special tokens first (Qwen2)
    chat_template:  the model's Jinja chat template text, kept verbatim for HF
    """

    def __init__(self, vocab, merges, special_tokens=None, *, split_digits=False, pattern="gpt2",
                 nfc=False, bos_id=None, eos_id=None, pad_id=None, chat_template=None):
        if pattern not in _WORD_REGEXES:
            raise ValueError(f"unknown pre-tokenizer pattern {pattern!r} (known: {', '.join(_WORD_REGEXES)})")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.merge_ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.special_tokens = dict(special_tokens or {})
        self.split_digits, self.pattern, self.nfc = split_digits, pattern, nfc
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template

        self._id_to_bytes = {i: _unspell(t) for t, i in self.vocab.items() if t not in self.special_tokens}
        self._id_to_bytes.update({i: t.encode("utf-8") for t, i in self.special_tokens.items()})
        self.vocab_size = max(self._id_to_bytes) + 1
        self._special_re = _special_regex(self.special_tokens)
        self._cache: dict[str, list[int]] = {}

    # ---- constructors

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe):
        """OpenAI's GPT-2 release: `encoder.json` (token -> id) and `vocab.bpe` (merges)."""
        vocab = _read_json(encoder_json)
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_bpe}: expected one 'left right' merge per line")
        eot = vocab["<|endoftext|>"]
        return cls(vocab, merges, {"<|endoftext|>": eot}, bos_id=eot, eos_id=eot)

    @classmethod
    def from_tiktoken(cls, path, special_tokens=None):
        """A tiktoken rank file: one 'base64(token bytes) rank' per line (GPT-2's r50k by default)."""
        ranks = {}
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{n}: expected 'base64-token rank'") from None
        vocab = {_spell(t): r for t, r in ranks.items()}
        merges = [(_spell(a), _spell(b)) for a, b in _merges_from_ranks(ranks)]
        if special_tokens is None:  # GPT-2: the one special follows the 50,256 ranked tokens
            special_tokens = {"<|endoftext|>": len(ranks)}
        eot = special_tokens.get("<|endoftext|>")
        return cls(vocab, merges, special_tokens, bos_id=eot, eos_id=eot)

    @classmethod
    def from_hf_json(cls, path):
        """An HF `tokenizer.json` with a byte-level BPE model.

        All `added_tokens` become special tokens. `tokenizer_config.json` (or
        `special_tokens_map.json`, `chat_template.jinja`) next to it, when present, gives
        the bos/eos/pad tokens and the chat template.
        """
        path = Path(path)
        data = _read_json(path)
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE" or "merges" not in model:
            raise ValueError(f"{path}: model type {model.get('type')!r} is not a BPE model")
        normalizer = data.get("normalizer")
        if normalizer is not None and normalizer != {"type": "NFC"}:
            raise ValueError(f"{path}: normalizer {json.dumps(normalizer)[:100]} is not supported "
                             "(NFC or none)")
        split_digits, pattern = cls._parse_pre_tokenizer(data.get("pre_tokenizer"), path)
        # tokenizers < 0.20 writes merges as "a b", later versions as ["a", "b"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}

        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
            if path.with_name(name).exists():
                config.update(_read_json(path.with_name(name)))
        if "chat_template" not in config and path.with_name("chat_template.jinja").exists():
            config["chat_template"] = path.with_name("chat_template.jinja").read_text(encoding="utf-8")
        if "<|endoftext|>" in specials and "eos_token" not in config:
            # GPT-2's hub files name no bos/eos: HF's GPT-2 tokenizer defaults both to <|endoftext|>
            config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")

        def token_id(key):
            token = config.get(key)
            if isinstance(token, dict):  # older configs store an AddedToken dict
                token = token.get("content")
            return specials.get(token, model["vocab"].get(token)) if token is not None else None

        return cls(model["vocab"], merges, specials, split_digits=split_digits, pattern=pattern,
                   nfc=normalizer is not None, bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                   pad_id=token_id("pad_token"), chat_template=config.get("chat_template"))

    @staticmethod
    def _parse_pre_tokenizer(config, path) -> tuple[bool, str]:
        """Accept ByteLevel (GPT-2), Digits(individual) + ByteLevel (SmolLM2) or Qwen2's
        Split(QWEN2_SPLIT) + ByteLevel without its own regex; return (split_digits, pattern)."""
        steps = config.get("pretokenizers", []) if config and config.get("type") == "Sequence" else [config]
        kinds = []
        for step in steps:
            step = step or {}
            if (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                    and step.get("use_regex", True)):
                kinds.append("bytelevel")
            elif step.get("type") == "ByteLevel" and not step.get("add_prefix_space"):
                kinds.append("bytes only")
            elif step.get("type") == "Digits" and step.get("individual_digits"):
                kinds.append("digits")
            elif (step.get("type") == "Split" and step.get("pattern") == {"Regex": QWEN2_SPLIT}
                  and step.get("behavior") == "Isolated" and not step.get("invert")):
                kinds.append("qwen2")
            else:
                kinds.append(None)
        if kinds == ["bytelevel"]:
            return False, "gpt2"
        if kinds == ["digits", "bytelevel"]:
            return True, "gpt2"
        if kinds == ["qwen2", "bytes only"]:
            return False, "qwen2"
        raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(config)[:200]}")

    @classmethod
    def from_gguf(cls, path):
        """The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata (llama.cpp's names)."""
        import gguf  # only this constructor needs it
        from .tensorfile import check_gguf

        check_gguf(path)  # every length and offset in the header against the file, before gguf maps any of it
        try:
            reader = gguf.GGUFReader(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # the reader raises several types on a damaged file
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

        def field(name, default=None):
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "gpt2")
        if model != "gpt2":
            raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; "
                             "only byte-level BPE ('gpt2') is supported")
        if pre not in _GGUF_PRE:
            raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                             f"(known: {', '.join(_GGUF_PRE)})")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type", [])
        specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in _GGUF_SPECIAL_TYPES}
        alphabet = set(_byte_to_char().values())
        # a few converters store plain tokens as raw text; respell those in the byte alphabet
        vocab = {t if t in specials or set(t) <= alphabet else _spell(t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges", [])]
        return cls(vocab, merges, specials, **_GGUF_PRE[pre],
                   bos_id=field("tokenizer.ggml.bos_token_id"), eos_id=field("tokenizer.ggml.eos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   chat_template=field("tokenizer.chat_template"))

    # ---- encode / decode

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, special-token text becomes its id; otherwise it is
        encoded like any other text. Adds no BOS/EOS (neither GPT-2 nor SmolLM2 does)."""
        ids = []
        for piece, is_special in _split_on(self._special_re if allow_special else None, text):
            if is_special:
                ids.append(self.special_tokens[piece])
                continue
            for word in self._pre_tokenize(piece):
                ids.extend(self._encode_word(word))
        return ids

    def _pre_tokenize(self, text: str) -> list[str]:
        if self.nfc:  # Qwen2: 'e' + U+0301 is read as the one character 'é'
            text = unicodedata.normalize("NFC", text)
        # SmolLM2 cuts every number character out first, so the word regex never sees a
        # digit next to a space ("a  1" -> "a", "  ", "1") and numbers are read digit by digit.
        chunks = _number_regex().split(text) if self.split_digits else [text]
        words = _WORD_REGEXES[self.pattern]()
        return [word for chunk in chunks if chunk for word in words.findall(chunk)]

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            # A vocabulary may lack some bytes (SmolLM2 has no token for 0x04, 0xF1, ...): like HF
            # tokenizers without an unk token, drop them before merging rather than fail.
            symbols = [c for c in _spell(word.encode("utf-8")) if c in self.vocab]
            symbols = _bpe_merge(symbols, lambda a, b: self.merge_ranks.get((a, b), math.inf))
            ids = [self.vocab[s] for s in symbols]
            if len(self._cache) > 100_000:  # words repeat a lot; keep memory bounded anyway
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text. Bytes that do not form valid UTF-8 (a cut-off character) become U+FFFD."""
        special_ids = set(self.special_tokens.values()) if skip_special else ()
        data = b"".join(self._id_to_bytes[int(i)] for i in ids if int(i) not in special_ids)
        return data.decode("utf-8", errors="replace")

    # ---- chat

    @property
    def chat_format(self) -> str | None:
        """'chatml' when the model's template uses <|im_start|>/<|im_end|> turns; 'transcript'
        when there is no template (a pretrained model such as GPT-2)."""
        if not self.chat_template:
            return "transcript"
        return "chatml" if "<|im_start|>" in self.chat_template else None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Render [{'role', 'content'}, ...] as ChatML, as SmolLM2-Instruct's template does:

            <|im_start|>{role}\\n{content}<|im_end|>\\n   per message,
            <|im_start|>assistant\\n                       when add_generation_prompt,

        with the template's default system message first when the chat has none; without a
        template, a plain transcript (`transcript_chat`).
        """
        if self.chat_format == "transcript":
            return transcript_chat(messages, add_generation_prompt)
        if self.chat_format != "chatml":
            raise ValueError("this tokenizer's chat template is not ChatML")
        default_system = _CHATML_SYSTEM.search(self.chat_template)
        turns = []
        if messages and messages[0]["role"] != "system" and default_system:
            turns.append(f"<|im_start|>system\n{default_system.group(1)}<|im_end|>\n")
        turns += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            turns.append("<|im_start|>assistant\n")
        return "".join(turns)

    @property
    def applied_chat_template(self) -> str | None:
        """apply_chat_template's rendering as Jinja: the model's own ChatML template (which it
        follows), or the transcript's."""
        return {"transcript": TRANSCRIPT_CHAT_TEMPLATE, "chatml": self.chat_template}.get(self.chat_format)

    @property
    def chat_stop_ids(self) -> set:
        """Ids that end a chat answer: EOS, and ChatML's end of turn or, in a transcript, any
        token holding a newline."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        if self.chat_format == "transcript":
            ids |= self._newline_ids
        elif "<|im_end|>" in self.special_tokens:
            ids.add(self.special_tokens["<|im_end|>"])
        return ids

    @functools.cached_property
    def _newline_ids(self) -> frozenset:
        """Every token holding a newline, scanned once rather than for every chat request."""
        return frozenset(i for i, piece in self._id_to_bytes.items() if b"\n" in piece)

    # ---- save

    def save(self, directory) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` in the layout HF tokenizers reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": self.pattern == "gpt2"}
        steps = [byte_level]
        if self.pattern == "qwen2":
            steps.insert(0, {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated",
                             "invert": False})
        if self.split_digits:
            steps.insert(0, {"type": "Digits", "individual_digits": True})
        pre_tokenizer = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for t, i in sorted(self.special_tokens.items(), key=lambda item: item[1])]
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "NFC"} if self.nfc else None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": self.vocab,
                      "merges": [" ".join(m) for m in self.merges]},
        }
        token_text = {i: t for t, i in {**self.vocab, **self.special_tokens}.items()}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token_text.get(self.bos_id),
            "eos_token": token_text.get(self.eos_id),
            "pad_token": token_text.get(self.pad_id),
            "chat_format": self.chat_format,
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                         encoding="utf-8")


# --------------------------------------------------------------------------- sentencepiece-style BPE

_SPACE_MARK = "\u2581"    # '▁': sentencepiece writes a space as this character inside its pieces


# transcript_chat (below) as a Jinja template: what a client renders to see the prompt the
# server builds (GET /tokenizer_info reports it)
TRANSCRIPT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def transcript_chat(messages, add_generation_prompt: bool = True) -> str:
    """[{'role', 'content'}, ...] as a plain transcript, 'User: ...\\nAssistant:', the chat of a
    pretrained model whose files hold no template: it never saw turn tokens but has read many
    transcripts, and it ends its answer with the line (so the stop is any newline token)."""
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}\n" for m in messages]
    return "".join(lines) + ("Assistant:" if add_generation_prompt else "")


# Gemma's chat turns, as the instruction-tuned models' template writes them (apply_chat_template
# renders them in Python): BOS, then <start_of_turn>{user|model}\n{text}<end_of_turn>\n per
# message, a system message joined to the first user turn, <start_of_turn>model\n to answer.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim ~ '\\n\\n' %}{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ns.system }}{{ m['content'] | trim }}<end_of_turn>\n{% set ns.system = '' %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


class SentencePieceBPE:
    """Sentencepiece's BPE over a scored vocabulary, as Gemma's GGUF stores it
    (tokenizer.ggml.model 'llama'; Sennrich et al. 2016, Kudo & Richardson 2018).

    No pre-tokenizer: between the special and user-defined tokens (matched whole, longest
    first), spaces become '▁' and the whole run of text is one word. It starts as single
    characters, a character missing from the vocabulary as its UTF-8 bytes '<0xNN>' (byte
    fallback), and the adjacent pair that makes the best-ranked token merges first, leftmost
    on ties, until no pair makes a token. The rank is the merge list's order when one is given
    (tokenizer.json); a GGUF gives none, and the rank is then the vocabulary's order (lower id
    first, on Gemma the order of its scores), longer left part first for the same token:
    the rule transformers uses to rebuild the merges of a Gemma GGUF.

    special_tokens: control tokens (<bos>, <start_of_turn>, ...), dropped by decode(skip_special)
    added_tokens:   user-defined ones ('\n\n', tab runs, ...), matched whole, decoded as text
    add_bos:        whether a sequence starts with BOS (the caller adds it: encode() never does)
    """

    def __init__(self, vocab, special_tokens, added_tokens=None, merges=None, *, bos_id=None, eos_id=None,
                 pad_id=None, unk_id=None, add_bos=False, chat_template=None):
        self.vocab = dict(vocab)
        self.special_tokens, self.added_tokens = dict(special_tokens), dict(added_tokens or {})
        self.merges = None if merges is None else [tuple(m) for m in merges]
        self.merge_ranks = None if merges is None else {pair: i for i, pair in enumerate(self.merges)}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos, self.chat_template = add_bos, chat_template
        self._pieces = {i: t for t, i in self.vocab.items()}
        self._pieces.update({i: t for t, i in {**self.added_tokens, **self.special_tokens}.items()})
        self.vocab_size = max(self._pieces) + 1
        self._split_all = _special_regex({**self.special_tokens, **self.added_tokens})
        self._split_added = _special_regex(self.added_tokens)
        self._byte_of = {self.vocab[f"<0x{b:02X}>"]: b for b in range(256) if f"<0x{b:02X}>" in self.vocab}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, path):
        """The vocabulary, token types and special ids of a GGUF (`tokenizer.ggml.*`)."""
        import gguf
        from .tensorfile import check_gguf

        check_gguf(path)
        try:
            reader = gguf.GGUFReader(path)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

        def field(name, default=None):
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        if field("tokenizer.ggml.model") != "llama":
            raise ValueError(f"{path}: tokenizer.ggml.model is {field('tokenizer.ggml.model')!r}, "
                             "not a sentencepiece vocabulary ('llama')")
        # Gemma stores its runs of spaces as real spaces; in the text they are '▁' runs
        stored = field("tokenizer.ggml.tokens")
        tokens = [_SPACE_MARK * len(t) if " " in t and not t.strip() else t for t in stored]
        types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3}      # CONTROL
        # USER_DEFINED ('\n\n', '\t\t', ...), as transformers does: the space runs respelled
        # above are left to the merges
        added = {t: i for i, (t, s, kind) in enumerate(zip(tokens, stored, types)) if kind == 4 and t == s}
        return cls(vocab, special, added, bos_id=field("tokenizer.ggml.bos_token_id"),
                   eos_id=field("tokenizer.ggml.eos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id"),
                   unk_id=field("tokenizer.ggml.unknown_token_id"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", True)),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_hf_json(cls, path):
        """An HF tokenizer.json of this kind (BPE with byte fallback, spaces as '▁'), with its
        tokenizer_config.json: what `save` writes."""
        path = Path(path)
        data = _read_json(path)
        model = data.get("model") or {}
        config = _read_json(path.with_name("tokenizer_config.json")) if path.with_name(
            "tokenizer_config.json").exists() else {}
        spaces = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE_MARK}
        if model.get("type") != "BPE" or data.get("normalizer") != spaces:
            raise ValueError(f"{path}: not Gemma's kind of tokenizer (BPE with spaces written as "
                             f"'{_SPACE_MARK}' and nothing else normalised)")
        added = data.get("added_tokens", [])
        vocab = model["vocab"]
        merges = None
        if config.get("merge_order") != "vocabulary":  # written by someone else: their merge list
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        if "chat_template" not in config and path.with_name("chat_template.jinja").exists():
            config["chat_template"] = path.with_name("chat_template.jinja").read_text(encoding="utf-8")

        def token_id(key):
            token = config.get(key)
            if isinstance(token, dict):  # older configs store an AddedToken dict
                token = token.get("content")
            return vocab.get(token) if token is not None else None

        return cls(vocab, {t["content"]: t["id"] for t in added if t.get("special")},
                   {t["content"]: t["id"] for t in added if not t.get("special")}, merges,
                   bos_id=token_id("bos_token"), eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                   unk_id=token_id("unk_token"), add_bos=bool(config.get("add_bos_token", False)),
                   chat_template=config.get("chat_template"))

    # ---- encode / decode

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids, without BOS (see add_bos). Without allow_special, control-token text is
        encoded as text; the user-defined tokens ('\n', ...) are always matched."""
        ids = []
        split = self._split_all if allow_special else self._split_added
        for piece, whole in _split_on(split, text):
            if whole:
                ids.append(self.special_tokens.get(piece, self.added_tokens.get(piece)))
            else:
                ids.extend(self._encode_word(piece.replace(" ", _SPACE_MARK)))
        return ids

    def _rank(self, a: str, b: str):
        if self.merge_ranks is not None:
            return self.merge_ranks.get((a, b))
        merged = self.vocab.get(a + b)
        return None if merged is None else (merged, -len(a))

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = []
        for c in word:
            if c in self.vocab:
                symbols.append(c)
            else:  # byte fallback
                symbols += [f"<0x{b:02X}>" for b in c.encode("utf-8")]
        # a heap of (rank, start) over the adjacent pairs of a linked list: a word here can be a
        # whole paragraph, too long to rescan for the best pair after every merge
        nxt = list(range(1, len(symbols) + 1))
        prv = list(range(-1, len(symbols) - 1))
        heap = [(r, i) for i in range(len(symbols) - 1)
                if (r := self._rank(symbols[i], symbols[i + 1])) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j >= len(symbols) or self._rank(symbols[i], symbols[j]) != r:
                continue                                              # an entry made stale by a merge
            symbols[i], symbols[j] = symbols[i] + symbols[j], None
            nxt[i] = nxt[j]
            if nxt[i] < len(symbols):
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b < len(symbols) and (r := self._rank(symbols[a], symbols[b])) is not None:
                    heapq.heappush(heap, (r, a))
        ids = [self.vocab[s] for s in symbols if s is not None]
        if len(word) < 200:  # short words repeat (labels, templates); keep memory bounded
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text: '▁' back to a space, runs of byte tokens joined and read as UTF-8 (one
        U+FFFD per byte token when they do not form valid UTF-8, as HF's ByteFallback does)."""
        out, run = [], []

        def flush():
            if run:
                try:
                    out.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run.clear()

        skipped = set(self.special_tokens.values()) if skip_special else ()
        for i in map(int, ids):
            if i in skipped:
                continue
            if i in self._byte_of:
                run.append(self._byte_of[i])
                continue
            flush()
            out.append(self._pieces[i].replace(_SPACE_MARK, " "))
        flush()
        return "".join(out)

    # ---- chat

    @property
    def chat_format(self) -> str | None:
        """'gemma' when the template uses <start_of_turn> turns (the instruction-tuned models);
        'transcript' when there is no template (the pretrained ones, such as the 270M GGUF)."""
        if not self.chat_template:
            return "transcript"
        return "gemma" if "<start_of_turn>" in self.chat_template else None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Render [{'role', 'content'}, ...] after BOS as Gemma's turns (GEMMA_CHAT_TEMPLATE:
        'assistant' written as 'model', a system message put in front of the first user turn),
        or without a template as a plain transcript (`transcript_chat`)."""
        if self.chat_format is None:
            raise ValueError("this tokenizer's chat template is not Gemma's")
        turns = [self._pieces[self.bos_id]] if self.bos_id is not None else []
        if self.chat_format == "transcript":
            return "".join(turns) + transcript_chat(messages, add_generation_prompt)
        system = ""
        for m in messages:
            if m["role"] == "system":
                system = m["content"].strip() + "\n\n"
                continue
            role = "model" if m["role"] == "assistant" else m["role"]
            turns.append(f"<start_of_turn>{role}\n{system}{m['content'].strip()}<end_of_turn>\n")
            system = ""
        if add_generation_prompt:
            turns.append("<start_of_turn>model\n")
        return "".join(turns)

    @property
    def applied_chat_template(self) -> str | None:
        """apply_chat_template's rendering as Jinja (BOS first, as bos_token)."""
        if self.chat_format == "transcript":
            return ("{{ bos_token }}" if self.bos_id is not None else "") + TRANSCRIPT_CHAT_TEMPLATE
        return GEMMA_CHAT_TEMPLATE if self.chat_format == "gemma" else None

    @property
    def chat_stop_ids(self) -> set:
        """Ids that end a chat answer: EOS, and Gemma's end of turn or, in a transcript, any
        token holding a newline."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        if self.chat_format == "gemma":
            ids.add(self.special_tokens["<end_of_turn>"])
        elif self.chat_format == "transcript":
            ids |= self._newline_ids
        return ids

    @functools.cached_property
    def _newline_ids(self) -> frozenset:
        """Every token holding a newline: a scan of the whole vocabulary (~10 ms on Gemma's
        262,144), done once rather than for every chat request."""
        return frozenset(i for i, piece in self._pieces.items() if "\n" in piece)

    # ---- save

    def merge_list(self) -> list:
        """The merges in rank order (built from the vocabulary when none was given)."""
        if self.merges is not None:
            return self.merges
        merges = []
        for token, _ in sorted(self.vocab.items(), key=lambda item: item[1]):
            for k in range(len(token) - 1, 0, -1):
                if token[:k] in self.vocab and token[k:] in self.vocab:
                    merges.append((token[:k], token[k:]))
        return merges

    def save(self, directory) -> None:
        """tokenizer.json + tokenizer_config.json in the layout HF tokenizers reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": t in self.special_tokens}
                 for t, i in sorted({**self.added_tokens, **self.special_tokens}.items(), key=lambda x: x[1])]
        unk = self._pieces.get(self.unk_id)
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE_MARK},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE_MARK}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                      "ignore_merges": False, "vocab": self.vocab,
                      "merges": [list(m) for m in self.merge_list()]},
        }
        name = lambda i: self._pieces.get(i) if i is not None else None
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
            "unk_token": unk, "add_bos_token": self.add_bos, "chat_format": self.chat_format,
            "chat_template": self.chat_template,
            # the merge list above is the vocabulary's order: loading can skip reading it
            "merge_order": "vocabulary" if self.merges is None else "list",
        }
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                         encoding="utf-8")


# --------------------------------------------------------------------------- sentencepiece (T5)


class SentencePieceTokenizer:
    """T5's tokenizer: a sentencepiece unigram model plus `extra_ids` sentinel tokens.

    As in T5, sentinel `<extra_id_N>` has id piece_count + extra_ids - 1 - N, so with the
    32,000-piece model <extra_id_0> = 32099 ... <extra_id_99> = 32000. Sentinels and the
    control pieces (<pad>, </s>, <unk>) are recognised in text; every other piece of text is
    encoded by sentencepiece on its own, and EOS is appended.
    """

    def __init__(self, model_file, extra_ids: int = 100):
        import sentencepiece

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"{self.model_file}: no such file")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.model_file}: not a sentencepiece model ({e})") from None
        pieces = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # T5 has none
        self.unk_id = self.sp.unk_id()
        self.vocab_size = pieces + extra_ids
        self.special_tokens = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.unk_id)
                               if i is not None}
        self.special_tokens.update({f"<extra_id_{n}>": pieces + extra_ids - 1 - n for n in range(extra_ids)})
        self._text_of = {i: t for t, i in self.special_tokens.items()}
        self._special_re = _special_regex(self.special_tokens)

    def encode(self, text: str, allow_special: bool = True, add_eos: bool = True) -> list[int]:
        ids = []
        for piece, is_special in _split_on(self._special_re if allow_special else None, text):
            ids += [self.special_tokens[piece]] if is_special else self.sp.encode(piece)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids -> text, dropping pad and EOS unless skip_special is False. Sentinels stay."""
        skipped = {self.pad_id, self.eos_id} if skip_special else set()
        out, run = [], []

        def flush():
            if run:
                text = self.sp.decode(run)
                # sentencepiece drops the word-start '▁' of the first piece; after a sentinel keep it
                # as a space
                if out and self.sp.id_to_piece(run[0]).startswith("▁"):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in map(int, ids):
            if i in skipped:
                continue
            if i in self._text_of and i != self.unk_id:  # <unk> decodes as sentencepiece shows it, ' ⁇ '
                flush()
                out.append(self._text_of[i])
            else:
                run.append(i)
        flush()
        return "".join(out)

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "spiece.model"
        if target.resolve() != self.model_file.resolve():
            shutil.copyfile(self.model_file, target)


# --------------------------------------------------------------------------- loading


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory: `spiece.model` -> SentencePieceTokenizer,
    else `tokenizer.json` -> BPETokenizer. A single tokenizer file or a .gguf file works too."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        if path.suffix == ".json":
            return _json_tokenizer(path)
        return SentencePieceTokenizer(path)
    if (path / "spiece.model").is_file():
        return SentencePieceTokenizer(path / "spiece.model")
    if (path / "tokenizer.json").is_file():
        return _json_tokenizer(path / "tokenizer.json")
    raise FileNotFoundError(f"{path}: no tokenizer.json or spiece.model")


def _gguf_tokenizer(path):
    """Byte-level BPE ('gpt2') or a sentencepiece vocabulary ('llama', Gemma's) from a GGUF."""
    import gguf
    from .tensorfile import check_gguf
    check_gguf(path)
    try:
        f = gguf.GGUFReader(path).fields.get("tokenizer.ggml.model")
    except Exception:  # a damaged file: from_gguf says why
        f = None
    return (SentencePieceBPE if f is not None and f.contents() == "llama" else BPETokenizer).from_gguf(path)


def _json_tokenizer(path):
    """An HF tokenizer.json: sentencepiece-style (byte fallback) or byte-level BPE."""
    model = (_read_json(path).get("model") or {})
    return (SentencePieceBPE if model.get("byte_fallback") else BPETokenizer).from_hf_json(path)
