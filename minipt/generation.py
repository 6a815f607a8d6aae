"""Text generation for both model families: greedy, temperature, top-k and top-p
sampling, stopping at EOS, batches of prompts of different lengths.

Decoder batches are left-padded so every row's next token sits in the last column; the
model's static KV cache is filled once by the prompt (prefill) and then one token per step,
or, greedy with `lookup`, several: prompt-lookup drafts checked in one forward.
"""
import math

import torch

from .config import GPTConfig
from .packed import packs_unchanged


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # drop tokens once the mass before them exceeds top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


MAX_STOP = 4          # stop strings per request, OpenAI's bound


class SettingError(ValueError):
    """A decoding setting out of its range; `field` names it (the server's 400 says which)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_sampling(max_new_tokens: int, temperature=0.0, top_k=None, top_p=None, stop=None) -> None:
    """Decoding settings in their ranges, or a one-line SettingError (a ValueError) naming the
    one that is not. The one check of generate.py, `generate`, `decode_steps` and the server."""
    if max_new_tokens < 1:
        raise SettingError("max_new_tokens", f"max_new_tokens={max_new_tokens}: must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SettingError("temperature",
                           f"temperature={temperature}: must be a finite number >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise SettingError("top_k", f"top_k={top_k}: must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise SettingError("top_p", f"top_p={top_p}: must be in (0, 1]")
    if stop is not None and (len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop)):
        raise SettingError("stop", f"stop: at most {MAX_STOP} non-empty strings")


def check_context(extra: int, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """The prompt method's positions, the prompt and the new tokens within the context."""
    if extra + prompt_tokens + max_new_tokens > context:
        raise SettingError("max_new_tokens", f"{extra} virtual + {prompt_tokens} prompt + {max_new_tokens} "
                           f"new tokens exceed the context of {context}")


def pad_batch(rows: list[list[int]], pad_id: int, left: bool = True):
    """(ids, attention_mask), both (B, T) on the CPU (filled row by row there, then moved to
    the model's device in one copy); left padding right-aligns every row."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(rows), T, dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long, device="cpu")
        mask[i, cols] = 1
    return ids, mask


# inference_mode, not no_grad: the per-step tensors also skip version counters and view
# tracking (~2% a step). Nothing created in here outlives the call.
@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature=0.0, top_k=None,
             top_p=None, eos_id=None, pad_id=0, seed=None, lookup=0) -> list[list[int]]:
    """New tokens for each prompt (EOS excluded). `prompts` are lists of token ids; eos_id is an
    id or a collection of ids (a chat's end of turn).
    lookup: greedy decoding of one prompt (decoder models) with drafts of up to this many
    tokens by prompt lookup (see `_lookup_steps`); 0 decodes one token per forward."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if lookup < 0 or (lookup and (temperature > 0 or len(prompts) > 1
                                  or not isinstance(model.config, GPTConfig))):
        raise ValueError(f"generate: lookup={lookup}: a count >= 0, for greedy decoding of one prompt with a "
                         "decoder model")
    device = next(model.parameters()).device
    # on the logits' device: torch.multinomial refuses a generator on another one
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    pick = lambda logits: sample_next(logits[:, -1], temperature, top_k, top_p, gen)
    if lookup:
        steps = _lookup_steps(model, prompts[0], max_new_tokens, lookup, device)
    elif isinstance(model.config, GPTConfig):
        steps = _decoder_steps(model, prompts, max_new_tokens, pad_id, device, pick)
    else:
        steps = _encoder_decoder_steps(model, prompts, max_new_tokens, device, pick)
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)  # a Python list: indexing a tensor per row and step costs more
    try:
        for tokens in steps:
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        out[i].append(t)
            if all(done):
                break
    finally:
        steps.close()
        model.clear_cache()
    return out


@torch.inference_mode()
def stepwise_logits(model, ids: list[int]):
    """(T, V) fp32 logits of a decoder after each token of `ids`, fed one token a forward
    through the KV cache: what decoding computes at every step, along a given text."""
    device = next(model.parameters()).device
    step = _one_token_forward(model)
    model.setup_cache(1, len(ids))
    try:
        logits = []
        for i, t in enumerate(ids):
            forward = step if i else model               # the first token is the prefill, as in generate
            logits.append(forward(torch.tensor([[t]], device=device), cache_pos=i,
                                  last_only=True)[0][0].float())
        return torch.cat(logits)
    finally:
        model.clear_cache()


def _check_context(model, T: int, max_new_tokens: int):
    try:  # extra_positions: a prompt method's virtual tokens / prefix
        check_context(model.extra_positions, T, max_new_tokens, model.config.max_seq_len)
    except SettingError as e:
        raise SettingError(e.field, f"generate: {e}") from None


def _decoder_loop(model, prompts, steps, pad_id, device):
    """The one decoding loop of a decoder model, under `generate` and `decode_steps`: the
    prompts left-padded and prefilled into the KV cache, then one token per forward. Yields
    each step's last-position logits (B, 1, V) and is sent the tokens (B,) chosen from them;
    ends after `steps` tokens, freeing the cache however it ends."""
    ids, mask = pad_batch(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    # a batch without padding needs no mask at all (the cheaper attention path)
    padded = bool((mask == 0).any())
    step = _one_token_forward(model)
    model.setup_cache(B, T + steps)
    try:
        logits, _ = model(ids, attention_mask=mask if padded else None, cache_pos=0, last_only=True)
        for pos in range(T, T + steps):
            nxt = yield logits
            if pos + 1 == T + steps:
                return
            if padded:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits, _ = step(nxt[:, None], attention_mask=mask if padded else None, cache_pos=pos,
                             last_only=True)
    finally:
        model.clear_cache()


def _decoder_steps(model, prompts, max_new_tokens, pad_id, device, pick):
    """Yield the next token of every row, max_new_tokens times."""
    _check_context(model, max(len(p) for p in prompts), max_new_tokens)
    loop = _decoder_loop(model, prompts, max_new_tokens, pad_id, device)
    try:
        logits = next(loop)
        while True:
            nxt = pick(logits)
            yield nxt
            logits = loop.send(nxt)
    except StopIteration:
        return
    finally:
        loop.close()


def compile_decoding(model):
    """torch.compile the one-token forward of a decoder model, `model.compiled_step`, for
    `generate` and `decode_steps` to run at every new token (prefill and lookup's checks of
    several tokens stay eager). It pays with packed weights (minipt.packed): a packed token is
    ~12 ms of int4 products and ~6 ms of small ops around them (norms, RoPE, casts, residual
    adds), each a dispatch and a pass over memory, which the compiled graph fuses into a few
    loops. An fp32 token is bound by reading the weights and gains nothing. The first step
    compiles (~1 minute on 2 cores, under half that when inductor's on-disk cache has the
    kernels). Shapes are dynamic, so one graph serves every position and prompt length; a
    batch of one row, a larger one and a left-padded one compile once each. Returns the model."""
    if not isinstance(model.config, GPTConfig):
        raise ValueError("compile_decoding: decoder models only "
                         "(an encoder-decoder decodes through model.decode)")
    model.compiled_step = torch.compile(model.forward, dynamic=True)
    return model


def _one_token_forward(model):
    """What runs a one-token step: the compiled forward, unless a packed weight has changed
    since packing (compiled code cannot notice it, see packed.PackedWeight.applies)."""
    step = getattr(model, "compiled_step", None)
    return step if step is not None and packs_unchanged(model) else model


def _lookup_steps(model, prompt, max_new_tokens, k, device):
    """Greedy decoding of one prompt, yielding (1,) tokens, with prompt-lookup drafts
    (Saxena 2023): the tokens that followed the latest earlier occurrence of the text's last
    few tokens are guessed to follow again, and one forward over the last token plus up to
    k guesses checks them all. The guesses the model agrees with, and its own next token
    after them, are kept; the KV cache positions of rejected guesses are simply written over.
    A one-row forward is bound by reading the weights, so checking k+1 tokens costs about as
    much as one: text that repeats itself (a prompt's phrases, code, a small model's loops)
    comes several tokens a forward. The tokens are plain greedy decoding's, up to rounding:
    a product of k+1 rows may round differently from one row's, which can flip a near-tie."""
    T = len(prompt)
    _check_context(model, T, max_new_tokens)
    model.setup_cache(1, T + max_new_tokens)
    logits, _ = model(torch.tensor([prompt], device=device), cache_pos=0, last_only=True)
    seq = list(prompt) + [int(logits[0, -1].argmax())]
    yield torch.tensor(seq[-1:], device="cpu")                # host tokens, as `generate` reads them
    pos = T                                                   # where seq[-1] goes in the cache
    size = k                                                  # draft length, halved after misses
    while len(seq) - T < max_new_tokens:
        draft = _lookup_draft(seq, min(size, max_new_tokens - (len(seq) - T) - 1))
        logits, _ = model(torch.tensor([seq[-1:] + draft], device=device), cache_pos=pos)
        greedy = logits[0].argmax(-1).tolist()                # the model's token after each input
        m = 0
        while m < len(draft) and draft[m] == greedy[m]:
            m += 1
        for t in greedy[:m + 1]:
            seq.append(t)
            yield torch.tensor([t], device="cpu")
        pos += m + 1
        if draft:
            size = min(k, size * 2) if m == len(draft) else max(1, size // 2)


def _lookup_draft(seq: list[int], n_max: int) -> list[int]:
    """n_max tokens that followed the latest earlier occurrence of seq's last 3 tokens (else
    its last 2), copied as LZ77 copies: a copy that reaches the end of seq goes on with its
    own first tokens, so a loop of period p drafts n_max tokens, not p."""
    for n in (3, 2):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                draft = []
                for j in range(start + n, start + n + n_max):
                    draft.append(seq[j] if j < len(seq) else draft[j - len(seq)])
                return draft
    return []


def _encoder_decoder_steps(model, prompts, max_new_tokens, device, pick):
    cfg = model.config
    ids, mask = pad_batch(prompts, cfg.pad_id, left=False)  # the encoder sees the whole input at once
    ids, mask = ids.to(device), mask.to(device)
    enc = model.encode(ids, attention_mask=mask)
    B = ids.size(0)
    model.setup_cache(B, max_new_tokens)
    tok = torch.full((B, 1), cfg.decoder_start_id, dtype=torch.long, device=device)
    for pos in range(max_new_tokens):
        logits = model.decode(tok, enc, encoder_mask=mask, cache_pos=pos)
        tok = pick(logits)[:, None]
        yield tok[:, 0]


# ---- step-wise decoding with settings per row (the server's batches) ------------------------

def _per_row(value, B: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"decode_steps: {len(value)} values of {name} for {B} rows")
        return list(value)
    return [value] * B


@torch.inference_mode()
def decode_steps(model, prompts: list[list[int]], max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
                 eos_id=None, pad_id=0, seed=None, extra_positions=None, with_logits=False):
    """Decode a batch one step at a time, each row with its own settings (a decoder-only model).

    max_new_tokens, temperature, top_k, top_p, seed and extra_positions take one value for
    every row or a list with one per row; eos_id is an id or a collection of ids. Yields,
    once per step, a list with each row's new token, or None for a row that has stopped:
    a row stops after yielding an EOS id (which it does yield, so the caller can tell a
    finished answer from a cut one) or its max_new_tokens-th token. The generator ends when
    every row has stopped; closing it early is fine (the KV cache is freed either way).

    Greedy rows get exactly `generate`'s tokens. Sampled rows draw one at a time, each from
    its own seeded generator when it has a seed, so a row's sample does not depend on which
    other rows share its batch (`generate` draws the whole batch at once instead).
    extra_positions: the context each row's prompt method takes (virtual tokens, prefix);
    by default the model's, the batch's longest. with_logits: yield (tokens, logits (B, V)), the
    logits each row's token came from.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decode_steps: every prompt needs at least one token")
    B = len(prompts)
    max_new = _per_row(max_new_tokens, B, "max_new_tokens")
    temps, top_ks, top_ps = (_per_row(v, B, n) for v, n in ((temperature, "temperature"), (top_k, "top_k"),
                                                           (top_p, "top_p")))
    seeds = _per_row(seed, B, "seed")
    extras = _per_row(model.extra_positions if extra_positions is None else extra_positions, B,
                      "extra_positions")
    eos = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    for i, (p, n, extra) in enumerate(zip(prompts, max_new, extras)):
        try:
            check_sampling(max(n, 1), temps[i] or 0.0, top_ks[i], top_ps[i])  # 0 new tokens: an empty row
            check_context(extra, len(p), n, model.config.max_seq_len)
        except SettingError as e:
            raise SettingError(e.field, f"decode_steps: row {i}: {e}") from None
        if n < 0:
            raise SettingError("max_new_tokens", f"decode_steps: row {i}: max_new_tokens={n}: must be >= 0")
    steps = max(max_new)
    if steps == 0:
        return
    device = next(model.parameters()).device
    gens = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
    sampled = [i for i in range(B) if temps[i] and temps[i] > 0]

    live = [n > 0 for n in max_new]
    count = [0] * B
    loop = _decoder_loop(model, prompts, steps, pad_id, device)
    try:
        logits = next(loop)
        while True:
            last = logits[:, -1]
            nxt = last.argmax(-1)
            for i in sampled:
                if live[i]:
                    nxt[i] = sample_next(last[i:i + 1], temps[i], top_ks[i], top_ps[i], gens[i])[0]
            out = []
            for i, t in enumerate(nxt.tolist()):
                if not live[i]:
                    out.append(None)
                    continue
                out.append(t)
                count[i] += 1
                live[i] = t not in eos and count[i] < max_new[i]
            yield (out, last) if with_logits else out
            if not any(live):
                return
            # stopped rows keep decoding (their tokens are ignored): the static cache has a
            # fixed batch, and the live rows' step costs about the same either way
            logits = loop.send(nxt)
    except StopIteration:
        return
    finally:
        loop.close()
