"""Batching for prompt training: token ids with a loss on the target tokens only.

A row {"input", "target"} becomes the prompt `template.format(input=...)` followed by the
target. Only the target is learned: every other label is -100, which cross-entropy
ignores, so the prompt is trained to produce the answer and not to model the review.

Decoder-only (GPT) rows are one sequence, prompt + target, shifted by one:

    seq      p0 p1 p2 t0 t1          idx     = seq[:-1] = p0 p1 p2 t0
                                     targets = seq[1:] masked = -100 -100 t0 t1

T5 rows keep the two sides apart: the encoder reads the prompt, the decoder learns the
target (the model shifts the targets right itself). Both end with EOS, as in T5.

`Batches` draws the examples of each training step: a fresh, seeded permutation every
epoch (optionally grouped by length, so that batches carry little padding), resumable
from a two-number state, and split across data-parallel ranks.
"""
import string
import warnings

import numpy as np

from .generation import pad_batch
from .tokenizer import SentencePieceTokenizer


class TruncationWarning(UserWarning):
    """An example was longer than max_len and lost the left end of its input."""


def _warn_truncated(max_len: int) -> None:
    # one fixed text: Python's warning registry then shows it once, not once per example
    warnings.warn(f"inputs longer than max_len={max_len} tokens are truncated from the left",
                  TruncationWarning, stacklevel=3)


def check_template(template: str) -> None:
    """A template holds the row's text as `{input}` and no other field (literal braces are
    doubled, `{{` and `}}`); otherwise every row would become the same prompt, or none."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template={template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    other = [f for f in fields if f != "input"]
    if other:
        raise ValueError(f"template={template!r}: unknown field {{{other[0]}}}; rows have only {{input}}")
    if not fields:
        raise ValueError(f"template={template!r}: no {{input}}, so every row would be the same prompt")


def encode_text(tok, text: str) -> list[int]:
    """Token ids of text, without the EOS that the sentencepiece tokenizer adds by default."""
    if isinstance(tok, SentencePieceTokenizer):
        return tok.encode(text, add_eos=False)
    return tok.encode(text)


def with_bos(tok, ids: list[int]) -> list[int]:
    """BOS, then ids, when the tokenizer says a sequence begins with one (add_bos: Gemma, whose
    outputs go astray without it), unless ids start with it already (a chat template writes it)."""
    if getattr(tok, "add_bos", False) and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        return [tok.bos_id] + ids
    return ids


def encode_prompt(tok, text: str) -> list[int]:
    """Token ids of the text a sequence starts with (see with_bos)."""
    return with_bos(tok, encode_text(tok, text))


def encode_example(tok, template: str, row: dict, max_len: int, is_t5: bool, eos: bool = False) -> dict:
    """One row -> lists of ids (see `collate` for the keys).

    decoder: max_len bounds the whole sequence, prompt + target, so idx and targets get at
        most max_len - 1 ids. A long prompt loses tokens from its left end (the template's
        cue, right before the target, survives); a target that alone does not fit keeps its
        first max_len - 1 tokens. Either way a TruncationWarning is issued. eos appends EOS to
        the target (generation tasks, so the model learns to stop).
    T5: max_len bounds the encoder input and the target separately; both end with EOS.
    """
    prompt_text = template.format(input=row["input"])
    if is_t5:
        prompt, target = tok.encode(prompt_text), tok.encode(row["target"])       # both end with EOS
        if len(prompt) > max_len:
            prompt = prompt[-max_len:]
            _warn_truncated(max_len)
        if len(target) > max_len:
            target = target[:max_len - 1] + target[-1:]
        return {"input_ids": prompt, "targets": target}
    if max_len < 2:
        raise ValueError("encode_example: max_len must be at least 2 (one prompt and one target token)")
    prompt, target = encode_prompt(tok, prompt_text), encode_text(tok, row["target"])
    if eos:
        target = target + [tok.eos_id]
    if not prompt or not target:
        raise ValueError(f"encode_example: empty {'prompt' if not prompt else 'target'} "
                         f"for input {row['input'][:50]!r}")
    if len(prompt) + len(target) > max_len:
        _warn_truncated(max_len)
    target = target[:max_len - 1]
    prompt = prompt[-(max_len - len(target)):]
    seq = prompt + target
    return {"idx": seq[:-1], "targets": [-100] * (len(prompt) - 1) + target}


def collate(rows: list[dict], tok, template: str, max_len: int, is_t5: bool, pad_id: int,
            eos: bool = False) -> dict:
    """A batch of rows -> right-padded tensors.

    decoder: idx (B, T), targets (B, T) with -100 outside the target tokens, attention_mask (B, T).
    T5: input_ids (B, S) with attention_mask (B, S); targets (B, T) padded with -100.
    """
    examples = [encode_example(tok, template, r, max_len, is_t5, eos) for r in rows]
    inputs = "input_ids" if is_t5 else "idx"
    ids, mask = pad_batch([e[inputs] for e in examples], pad_id, left=False)
    targets, _ = pad_batch([e["targets"] for e in examples], -100, left=False)
    return {inputs: ids, "attention_mask": mask, "targets": targets}


class Batches:
    """Endless global batches of example indices.

    Epoch e visits all n_examples in the order of a permutation seeded by (seed, e), so
    the sequence depends on nothing but these numbers. Batches run across epoch
    boundaries: the last, short stretch of an epoch is completed from the start of the
    next, so every batch has batch_size indices and no example is skipped.

    With `lengths` (any per-example size), each window of `bucket_batches` batches of the
    permutation is sorted by length before it is cut into batches, and the epoch's batches
    are then shuffled: a batch holds sequences of similar length, so padding (on short
    sentences, a quarter of the compute) mostly disappears, and batch order stays random.

        batches = Batches(len(rows), 16, seed=0)
        ids = next(batches)                         # 16 indices
        mine = batches.shard(ids, rank, world)      # this data-parallel rank's part
        saved = batches.state()                     # {"epoch": e, "position": p, ...}
        Batches(len(rows), 16, seed=0).load_state(saved)   # continues with the same batches
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, lengths=None,
                 bucket_batches: int = 8):
        if n_examples < 1 or batch_size < 1:
            raise ValueError(f"Batches: need n_examples and batch_size >= 1, got {n_examples}, {batch_size}")
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"Batches: {len(lengths)} lengths for {n_examples} examples")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.lengths = None if lengths is None or bucket_batches < 1 else np.asarray(lengths)
        self.window = batch_size * bucket_batches
        self.epoch, self.position = 0, 0   # position: examples of this epoch already handed out
        self._order = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` hands out the examples."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            return order
        windows = [order[i:i + self.window] for i in range(0, self.n, self.window)]
        order = np.concatenate([w[np.argsort(self.lengths[w], kind="stable")] for w in windows])
        n_full = self.n // self.batch_size * self.batch_size
        full = order[:n_full].reshape(-1, self.batch_size)
        return np.concatenate([full[rng.permutation(len(full))].ravel(), order[n_full:]])

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self._order is None:
                self._order = self.permutation(self.epoch)
            take = self._order[self.position:self.position + self.batch_size - len(out)]
            out += take.tolist()
            self.position += len(take)
            if self.position == self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n_examples": self.n, "seed": self.seed}

    def load_state(self, state: dict) -> "Batches":
        """Continue from `state()`; the batch size may differ (the position counts examples)."""
        for key, mine in (("n_examples", self.n), ("seed", self.seed)):
            if state.get(key, mine) != mine:
                raise ValueError(f"Batches.load_state: saved with {key}={state[key]}, this one has {mine}")
        if not 0 <= state["position"] < self.n:
            raise ValueError(f"Batches.load_state: position {state['position']} outside 0..{self.n - 1}")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
        return self

    @staticmethod
    def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
        """Rank `rank`'s contiguous part of a global batch; the parts of ranks 0..world_size-1
        partition it. The batch size must divide evenly, so every rank's gradient weighs the same."""
        if len(batch) % world_size:
            raise ValueError(f"Batches.shard: batch of {len(batch)} does not split over {world_size} ranks")
        k = len(batch) // world_size
        return batch[rank * k:(rank + 1) * k]
