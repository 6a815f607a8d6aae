"""The server's schedulers: which rows the model runs at each step (see minipt/serve.py).

StaticScheduler, request-level batching: the rows queued within a few ms decode as one batch
until its longest row ends; rows arriving meanwhile wait for the next batch, and a finished
row keeps its place until then.

ContinuousScheduler, iteration-level batching (Yu et al. 2022, Orca; Kwon et al. 2023, vLLM):
a row is prefilled alone, in chunks between decoding steps, joins the running batch at the
next step and leaves it at the step it ends. Each row keeps its own prompt (PromptBank's
pieces, computed once per prompt file; a LoRA applied to its row alone), sampling settings,
stop strings and stream. A prompt's virtual tokens are the same leading state for every row
that names it, so their keys and values are kept (`PromptStates`, an LRU) and the next such
row is prefilled from its first real token on: vLLM's prefix caching, for soft prompts.

Both schedulers score tokens for rows that ask for logprobs (`score`): the generated ones
from the logits they were picked from, an echoed prompt from the row's own prefill (the
continuous scheduler) or a forward of the row alone (static).

The running batch's KV cache (`Timeline`) is generation.py's left-padded layout stretched
over time: one column clock for the whole batch, every row's keys and values in a run of
columns that ends at the clock, the columns before its run masked like left padding.

    column    0 1 2 3 4 5 6 7 8 9     clock = 10: this step writes column 10 for every row
    row 0     a a a a a a a a a a     running since column 0
    row 1     . . . . . b b b b b     prefilled alone (5 columns), copied in to end at the clock
    row 2     . . . . . . . . c c

Positions are each row's own (its prefix's offset plus the columns of its run), so where a
run sits changes nothing: a row computes what it computes in a batch of its own, as in any
padded batch. The price of one clock is attention over masked columns, and copies: when the
masked columns before the oldest run outnumber its own, or the cache runs out of columns or
slots, the live runs are copied into a new cache (rarely: it keeps a quarter of headroom
and spare slots). Paged attention (vLLM) avoids both with a kernel of its own; this is
plain PyTorch over the model's own forward.
"""
import collections
import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from .generation import decode_steps, sample_next
from .layers import KVCache

log = logging.getLogger("minipt.serve")


class Overloaded(Exception):
    """The queue is full (or the server closing): a 503 whose Retry-After is `retry_after` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _percentiles(values) -> dict:
    s = sorted(values)
    return {f"p{q}": round(s[min(len(s) - 1, int(q / 100 * len(s)))] * 1000, 1) if s else None
            for q in (50, 90, 99)}


class Stats:
    """What GET /stats shows: counters, rows per step, tokens/s and finished rows per second
    over the last WINDOW seconds, latency percentiles (ms) of the last 1,000 finished rows."""
    WINDOW = 10.0

    def __init__(self):
        self.lock = threading.Lock()
        self.batch_sizes = collections.Counter()   # rows in a step (a static batch) -> count
        self.tokens = self.cancelled_rows = self.rejected_requests = 0
        self.recent = collections.deque()          # (time, tokens) of each step in the window
        self.ends = collections.deque()            # time of each finished row in the window
        self.latency = collections.deque(maxlen=1000)   # (first token, per token, whole) seconds

    def step(self, rows: int, tokens: int, batch: bool = True) -> None:
        now = time.monotonic()
        with self.lock:
            if batch:
                self.batch_sizes[rows] += 1
            self.tokens += tokens
            self.recent.append((now, tokens))
            self._trim(now)

    def cancelled(self) -> None:
        with self.lock:
            self.cancelled_rows += 1

    def finished(self, row) -> None:
        now = time.monotonic()
        with self.lock:
            self.ends.append(now)
            if row.t_first is not None:
                per_token = (now - row.t_first) / (row.n_tokens - 1) if row.n_tokens > 1 else None
                self.latency.append((row.t_first - row.t_arrived, per_token, now - row.t_arrived))
            self._trim(now)

    def _trim(self, now) -> None:
        while self.recent and self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()
        while self.ends and self.ends[0] < now - self.WINDOW:
            self.ends.popleft()

    def retry_after(self, rows: int) -> int:
        """Seconds until about `rows` rows have left, at the recent pace (1 to 30)."""
        with self.lock:
            pace = len(self.ends) / self.WINDOW
        return max(1, min(30, math.ceil(rows / pace))) if pace else 5

    def snapshot(self) -> dict:
        with self.lock:
            self._trim(time.monotonic())
            lat = list(self.latency)
            return {"batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "generated_tokens": self.tokens, "cancelled_rows": self.cancelled_rows,
                    "rejected_requests": self.rejected_requests,
                    "tokens_per_s": round(sum(n for _, n in self.recent) / self.WINDOW, 1),
                    "latency_ms": {"first_token": _percentiles([a for a, _, _ in lat]),
                                   "per_token": _percentiles([b for _, b, _ in lat if b is not None]),
                                   "request": _percentiles([c for _, _, c in lat])}}


@dataclass
class Scored:
    """One token's log-probability under the row's model (fp32 log-softmax of its logits), and
    the `top` most likely tokens at that place as [(id, logprob), ...]; None for a prompt's
    first token, which nothing scores."""
    token: int
    logprob: "float | None"
    top: "list | None"


def score(logits, tokens, k: int) -> list:
    """[Scored] of `tokens` (N,) under the logits (N, V) that chose them, each with its top k."""
    lp = logits.float().log_softmax(-1)                                  # (N, V)
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
    top_lp, top_ids = lp.topk(k, -1)                                     # (N, k) each
    return [Scored(t, c, list(zip(i, v))) for t, c, i, v in zip(tokens.tolist(), chosen, top_ids.tolist(),
                                                                top_lp.tolist())]


def _pick(row, logits, generator) -> int:
    """A row's next token from its (V,) logits: greedy, or sampled with its own settings."""
    if row.temperature <= 0:
        return int(logits.argmax())
    return int(sample_next(logits[None], row.temperature, row.top_k, row.top_p, generator)[0])


def _score_one(row, logits, token: int):
    """The row's Scored token from its (V,) logits, or None when it asked for no logprobs."""
    if row.logprobs is None:
        return None
    return score(logits[None], torch.tensor([token], device=logits.device), row.logprobs)[0]


def _generator(row, device):
    return None if row.seed is None else torch.Generator(device=device).manual_seed(row.seed)


# ==== static batching ========================================================================

class StaticScheduler:
    """One thread that owns the model: it takes the first queued row, waits `window` seconds
    (or until max_batch rows are queued) for more, and decodes them all in one batch, each
    row with its own prompt, max_tokens and sampling settings. Rows arriving meanwhile wait
    for the next batch. Only this thread touches the KV cache."""
    name = "static"
    states = None                 # no prompt states kept (see PromptStates)

    def __init__(self, app, max_batch: int = 16, window: float = 0.005, max_queue: int = 256):
        self.app, self.max_batch, self.window, self.max_queue = app, max_batch, window, max_queue
        self.queue: "queue.Queue" = queue.Queue()
        self.stats = Stats()
        self.running_rows = 0
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="minipt-scheduler", daemon=True)
        self.thread.start()

    def submit(self, rows) -> None:
        with self.lock:
            if self.closed:
                raise Overloaded("the server is shutting down", 5)
            if self.queue.qsize() + len(rows) > self.max_queue:
                self.stats.rejected_requests += 1
                raise Overloaded(f"the queue is full ({self.max_queue} rows): try again later",
                                 self.stats.retry_after(len(rows)))
            for r in rows:
                self.queue.put(r)

    def queued(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.queue.put(None)
        self.thread.join()

    def _collect(self):
        first = self.queue.get()
        if first is None:
            return None
        rows = [first]
        deadline = time.monotonic() + self.window
        while len(rows) < self.max_batch:
            try:
                r = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if r is None:                 # closing: finish this batch first
                self.queue.put(None)
                break
            rows.append(r)
        return rows

    def _loop(self) -> None:
        while (rows := self._collect()) is not None:
            for r in rows:
                if r.cancelled.is_set():  # gone while queued
                    self.stats.cancelled()
            rows = [r for r in rows if not r.cancelled.is_set()]
            self.running_rows = len(rows)
            try:
                self._decode(rows)
            except Exception as e:  # never let one bad batch stop the server
                log.exception("batch of %d failed", len(rows))
                for r in rows:
                    if not r.finished:
                        r.fail(f"generation failed: {e}")
            self.running_rows = 0

    def _decode(self, rows) -> None:
        app = self.app
        with app.lock:  # a prompt file may have gone since the request was parsed
            rows = [r for r in rows if _resolve(app, r) is not False]
            if not rows:
                return
            # the batch layout (each row's virtual tokens and prefixes) is computed here, once:
            # removing a prompt from the bank later does not touch a batch in flight
            model = app.bank.for_rows([r.spec for r in rows])
            # the echo first, its prompt scored by the row's model alone
            scores = [_prompt_scores(model, i, r) if r.scores_prompt else None for i, r in enumerate(rows)]
        self.stats.batch_sizes[len(rows)] += 1
        for r, s in zip(rows, scores):
            r.start(s)
        steps = decode_steps(model, [r.ids for r in rows], [r.max_tokens for r in rows],
                             temperature=[r.temperature for r in rows], top_p=[r.top_p for r in rows],
                             top_k=[r.top_k for r in rows], seed=[r.seed for r in rows],
                             extra_positions=[r.extra for r in rows], with_logits=True,
                             pad_id=app.pad_id)  # no eos_id: each Row knows its own (chat, ignore_eos)
        try:
            for tokens, logits in steps:
                n = 0
                for i, (r, t) in enumerate(zip(rows, tokens)):
                    if r.finished:
                        continue
                    if r.cancelled.is_set():
                        r.finished = True
                        self.stats.cancelled()
                    elif t is not None:
                        n += 1
                        r.feed(t, _score_one(r, logits[i], t))
                        if r.finished:
                            self.stats.finished(r)
                self.stats.step(len(rows), n, batch=False)
                if all(r.finished for r in rows):
                    break
        finally:
            steps.close()
        for r in rows:
            if not r.finished:
                r.finish("length")
                self.stats.finished(r)


@torch.inference_mode()
def _prompt_scores(model, i: int, row) -> list:
    """[Scored] of row i's prompt tokens after the first, from one forward of that row alone."""
    ids = torch.tensor([row.ids], device=model.bank.base.embed.weight.device)
    logits, _ = model.bank(ids, rows=[model.rows[i]])
    return score(logits[0, :-1], ids[0, 1:], row.logprobs)


def _resolve(app, row):
    """The row's prompt pieces (None: the bare base), or False after failing the row with a
    404 when its prompt file has gone since the request was parsed. Call under app.lock."""
    try:
        return app.bank.resolve(row.spec)
    except KeyError:
        row.fail(f"model {row.request['model']!r} was removed", 404, "invalid_request_error",
                 "model_not_found")
        return False


# ==== continuous batching ====================================================================

@contextlib.contextmanager
def _caches(base, caches):
    """The base's layers use these KV caches (one per layer) inside the block: the batch's
    cache and each joining row's own take turns on the one model."""
    saved = [layer.attn.cache for layer in base.layers]
    for layer, c in zip(base.layers, caches):
        layer.attn.cache = c
    try:
        yield
    finally:
        for layer, c in zip(base.layers, saved):
            layer.attn.cache = c


def _new_caches(base, batch_size: int, width: int) -> list:
    cfg, w = base.config, base.embed.weight
    return [KVCache(batch_size, cfg.n_kv_head, width, cfg.head_dim, w.dtype, w.device) for _ in base.layers]


class Joining:
    """A row on its way into the batch: its virtual tokens and prompt run through the model
    alone, a chunk at a time, into a KV cache of its own (`length` columns). The virtual
    tokens' keys and values are the same for every row with this prompt: taken from
    PromptStates when there, else computed with the first chunk and kept there."""

    def __init__(self, row, pieces, parts, bank):
        self.row, self.pieces, self.parts = row, pieces, parts   # parts: the loaded Pieces it composes
        self.layout = bank.batch_layout([pieces])      # the row's prompt pieces, as a batch of one
        self.P = self.layout["P"]
        self.length = self.P + len(row.ids)
        self.offset = 0 if pieces is None else pieces.position_offset
        self.done = 0                                  # prompt tokens in the cache so far
        self.caches = None
        self.generator = _generator(row, bank.base.embed.weight.device)
        self.last = None                               # the logits after the latest chunk (V,)
        self.prompt_scores = [] if row.scores_prompt else None

    @property
    def left(self) -> int:
        return len(self.row.ids) - self.done

    def run(self, bank, states, n: int) -> None:
        """The next n prompt tokens through the model (the virtual tokens before the first),
        scored when the row echoes with logprobs."""
        base = bank.base
        ids = torch.tensor([self.row.ids[self.done:self.done + n]], device=base.embed.weight.device)
        x = base.embed(ids)                                                          # (1, n, C)
        start = self.P + self.done                     # the cache column of this chunk's first token
        computing = False
        if self.caches is None:
            self.caches = _new_caches(base, 1, self.length)
            state = states.get(self.parts, self.P) if self.P else None
            if state is not None:
                for c, (k, v) in zip(self.caches, state):
                    c.k[0, :, :self.P], c.v[0, :, :self.P] = k, v
            elif self.P:                               # the virtual tokens go in with the first chunk
                x, start, computing = torch.cat([self.layout["vectors"], x], 1), 0, True
        positions = self.offset + torch.arange(start, self.P + self.done + n, device=x.device)[None]
        scoring = self.prompt_scores is not None
        with _caches(base, self.caches), bank.lora_rows(self.layout):
            logits, _ = base(inputs_embeds=x, position_ids=positions, prefixes=self.layout["prefixes"],
                             cache_pos=start, last_only=not scoring)
        if computing:
            states.put(self.parts, [(c.k[0, :, :self.P].clone(), c.v[0, :, :self.P].clone())
                                    for c in self.caches])
        logits = logits[0, -n:] if scoring else logits[0]                            # (n | 1, V)
        if scoring:  # position t scores token t + 1; the previous chunk's last scores this one's first
            before = logits[:-1] if self.last is None else torch.cat([self.last[None], logits[:-1]])
            self.prompt_scores += score(before, ids[0, 1:] if self.last is None else ids[0], self.row.logprobs)
        self.done += n
        self.last = logits[-1]


class PromptStates:
    """The keys and values of each prompt's virtual tokens, kept for the next rows that name
    it: they come first and attention is causal, so they are the same state for every
    request with that prompt (a shared prefix). An LRU of `capacity` prompts or compositions,
    keyed by the loaded prompt pieces they are made of (a reloaded file is a new key)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.states: "collections.OrderedDict" = collections.OrderedDict()
        self.hits = self.misses = self.saved_tokens = 0

    def get(self, parts, P: int) -> "list | None":
        """[(k, v) per layer], each (n_kv_head, P, hs), of the P virtual tokens of `parts`; None
        when not kept (a miss)."""
        entry = self.states.get(tuple(map(id, parts)))
        if entry is None:
            self.misses += 1
            return None
        self.states.move_to_end(tuple(map(id, parts)))
        self.hits += 1
        self.saved_tokens += P
        return entry[1]

    def put(self, parts, state: list) -> None:
        if self.capacity:
            # the entry holds the pieces its key names, so no key is reused by other objects
            self.states[tuple(map(id, parts))] = (parts, state)
            while len(self.states) > self.capacity:
                self.states.popitem(last=False)

    def snapshot(self) -> dict:
        return {"cached": len(self.states), "hits": self.hits, "misses": self.misses,
                "prefill_tokens_saved": self.saved_tokens}


@dataclass
class Slot:
    """A running row in the batch."""
    row: object
    start: int                    # the first cache column of its run
    offset: int                   # positions its joined prefix takes before its first column
    pieces: object                # its prompt (PromptBank Pieces) or None
    token: int                    # its latest token: the next step's input
    generator: "torch.Generator | None"


class Timeline:
    """The running batch and its KV cache, laid out as the module docstring draws it."""
    HEADROOM = 64                 # spare columns at least, when the cache is laid out anew

    def __init__(self, bank, max_slots: int):
        self.bank, self.base, self.max_slots = bank, bank.base, max_slots
        self.device = self.base.embed.weight.device
        self.reset()

    def reset(self) -> None:
        self.slots: "list[Slot | None]" = []   # None: a free slot (decoded along, ignored)
        self.caches = None
        self.clock = 0
        self.layout = None                     # the slots' prompts as one batch (PromptBank.batch_layout)
        self.stale = True

    @property
    def n_live(self) -> int:
        return sum(s is not None for s in self.slots)

    def live(self) -> "list[Slot]":
        return [s for s in self.slots if s is not None]

    def leave(self, i: int) -> None:
        self.slots[i] = None      # its prompt stays in the layout till the next one: it only feeds a free slot

    def join(self, ready) -> None:
        """Rows whose prefill is done, as (Joining, first token), into free slots."""
        self._fit([j.length for j, _ in ready])
        free = [i for i, s in enumerate(self.slots) if s is None]
        for (j, token), i in zip(ready, free):
            first = self.clock - j.length
            for c, own in zip(self.caches, j.caches):
                c.k[i, :, first:self.clock] = own.k[0]
                c.v[i, :, first:self.clock] = own.v[0]
            self.slots[i] = Slot(j.row, first, j.offset, j.pieces, token, j.generator)
        self.stale = True

    def _fit(self, lengths) -> None:
        """Make room for rows of these lengths and for the next column. Keeps the cache as it
        is when that fits (and under half the slots are free, and the masked columns before
        the oldest run are no more than its length); else copies the live runs into a new one."""
        live = [i for i, s in enumerate(self.slots) if s is not None]
        need = len(live) + len(lengths)
        if need == 0:
            return self.reset()
        lo = min((self.slots[i].start for i in live), default=self.clock)
        span = self.clock - lo
        width = 0 if self.caches is None else self.caches[0].k.size(2)
        if (self.caches is not None and need <= len(self.slots) < 2 * need
                and max(lengths, default=0) <= self.clock < width and lo <= max(span, self.HEADROOM)):
            return
        clock = max([span, *lengths])
        n_slots = max(need, min(self.max_slots, 3 * need // 2))  # spare slots: the next rows join in place
        caches = _new_caches(self.base, n_slots, clock + max(self.HEADROOM, clock // 4))
        if live:
            idx = torch.tensor(live, device=self.device)
            for new, old in zip(caches, self.caches):
                new.k[:len(live), :, clock - span:clock] = old.k[idx, :, lo:self.clock]
                new.v[:len(live), :, clock - span:clock] = old.v[idx, :, lo:self.clock]
        slots = [self.slots[i] for i in live] + [None] * (n_slots - len(live))
        for s in slots[:len(live)]:
            s.start += clock - self.clock
        self.slots, self.caches, self.clock, self.stale = slots, caches, clock, True

    def step(self):
        """One token for every slot: (B, V) logits; the clock moves on by one."""
        self._fit([])
        clock, dev = self.clock, self.device
        ids = torch.tensor([[s.token if s else 0] for s in self.slots], device=dev)
        start = torch.tensor([s.start if s else clock for s in self.slots], device=dev)
        offset = torch.tensor([s.offset if s else 0 for s in self.slots], device=dev)
        mask = torch.arange(clock + 1, device=dev)[None] >= start[:, None]           # (B, clock + 1)
        positions = (offset + clock - start)[:, None]                                 # (B, 1)
        if self.stale:
            self.layout = self.bank.batch_layout([s and s.pieces for s in self.slots])
            self.stale = False
        with _caches(self.base, self.caches), self.bank.lora_rows(self.layout):
            logits, _ = self.base(ids, attention_mask=mask, position_ids=positions,
                                  prefixes=self.layout["prefixes"], cache_pos=clock, last_only=True)
        self.clock += 1
        return logits[:, -1]


class ContinuousScheduler:
    """One thread that owns the model. Each iteration: admit queued rows while fewer than
    max_batch are in flight; prefill joining rows, up to `prefill_chunk` prompt tokens (a
    longer prompt goes in several iterations), and add the finished ones to the batch; run
    one decoding step for the batch, feeding every row its token and dropping the ended and
    the cancelled. A request waiting in the queue therefore starts after at most one step and
    one chunk of prefill, not after a whole batch."""
    name = "continuous"

    def __init__(self, app, max_batch: int = 16, max_queue: int = 256, prefill_chunk: int = 256,
                 prompt_states: int = 64):
        self.app, self.max_batch, self.max_queue = app, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.states = PromptStates(prompt_states)
        self.cv = threading.Condition()
        self.waiting: "collections.deque" = collections.deque()   # guarded by cv
        self.closing = False
        self.joining: "list[Joining]" = []                         # the scheduler thread's own
        self.batch = Timeline(app.bank, max_batch)
        self.stats = Stats()
        self.thread = threading.Thread(target=self._loop, name="minipt-scheduler", daemon=True)
        self.thread.start()

    def submit(self, rows) -> None:
        with self.cv:
            if self.closing:
                raise Overloaded("the server is shutting down", 5)
            if len(self.waiting) + len(rows) > self.max_queue:
                self.stats.rejected_requests += 1
                raise Overloaded(f"the queue is full ({self.max_queue} rows): try again later",
                                 self.stats.retry_after(len(rows)))
            self.waiting.extend(rows)
            self.cv.notify()

    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return self.batch.n_live + len(self.joining)

    def close(self) -> None:
        """Finish what was submitted, then stop."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        self.thread.join()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not (self.waiting or self.running_rows or self.closing):
                        self.cv.wait()
                    if not (self.waiting or self.running_rows):
                        return
                    admitted = []
                    while self.waiting and self.running_rows + len(admitted) < self.max_batch:
                        admitted.append(self.waiting.popleft())
                try:
                    self._admit(admitted)
                    self._prefill()
                    self._drop_cancelled()
                    if self.batch.n_live:
                        self._step()
                except Exception as e:  # never let one bad step stop the server
                    log.exception("decoding step failed")
                    for r in [s.row for s in self.batch.live()] + [j.row for j in self.joining]:
                        if not r.finished:
                            r.fail(f"generation failed: {e}")
                    self.batch.reset()
                    self.joining = []

    def _admit(self, rows) -> None:
        app = self.app
        with app.lock:  # the prompt is resolved now: a running row keeps it if its file goes
            for r in rows:
                if r.cancelled.is_set():
                    r.finished = True
                    self.stats.cancelled()
                elif (pieces := _resolve(app, r)) is not False:
                    parts = tuple(app.bank.pieces[n] for n in r.spec.split("+")) if r.spec else ()
                    self.joining.append(Joining(r, pieces, parts, app.bank))

    def _prefill(self) -> None:
        """Up to prefill_chunk prompt tokens of the joining rows, first come first served. A
        prompt is split only when it alone is longer than a chunk (a split prefill rounds
        differently from a whole one)."""
        budget, ready = self.prefill_chunk, []
        while self.joining and budget > 0:
            j = self.joining[0]
            if j.row.cancelled.is_set():
                self.joining.pop(0)
                j.row.finished = True
                self.stats.cancelled()
                continue
            if j.left > budget and budget < self.prefill_chunk:
                break                                        # next iteration, whole
            n = min(j.left, budget)
            j.run(self.app.bank, self.states, n)
            budget -= n
            if j.left:
                continue
            self.joining.pop(0)
            r = j.row
            r.start(j.prompt_scores)
            if r.max_tokens == 0:                            # echo only: the prompt scored, nothing generated
                r.finish("length")
                self.stats.finished(r)
                continue
            token = _pick(r, j.last, j.generator)
            self.stats.step(1, 1, batch=False)
            r.feed(token, _score_one(r, j.last, token))
            if r.finished:                                  # one token was all it needed
                self.stats.finished(r)
            else:
                ready.append((j, token))
        if ready:
            self.batch.join(ready)

    def _drop_cancelled(self) -> None:
        for i, s in enumerate(self.batch.slots):
            if s is not None and s.row.cancelled.is_set():
                s.row.finished = True
                self.stats.cancelled()
                self.batch.leave(i)

    def _step(self) -> None:
        logits = self.batch.step()
        greedy = logits.argmax(-1).tolist()
        live = 0
        for i, s in enumerate(self.batch.slots):
            if s is None:
                continue
            live += 1
            r = s.row
            t = greedy[i] if r.temperature <= 0 else _pick(r, logits[i], s.generator)
            r.feed(t, _score_one(r, logits[i], t))
            if r.finished:
                self.stats.finished(r)
                self.batch.leave(i)
            else:
                s.token = t
        self.stats.step(live, live)
