"""An OpenAI-compatible HTTP server: one frozen base model, every prompt file of a folder
served as its own model, requests for different prompts decoded together in one batch.

    python -m minipt.serve --base weights/smollm2-135m-instruct --prompts out/prompts --port 8000

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="sentiment", prompt="Review: ...\\nSentiment:", max_tokens=2)
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])

Models: "base" is the bare base model; every `NAME.safetensors` in the folder is model NAME
(a file added later is served on the next request, a removed one is dropped; the base loads
once); "a+b" serves prompts a and b composed (see minipt/prompts/mixed.py). Prompts of every
method and LoRAs (each row's own update, never merged) share a batch; a full fine-tuning
file is not (it replaces every weight of the base, not a part of it).

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST
/v1/chat/completions (with "stream": true as server-sent events), GET /stats (queued and
running rows, tokens/s, latency percentiles, rows per step, prompt states reused), GET
/health, and vLLM's tokenizer endpoints POST /tokenize, POST /detokenize, GET /tokenizer_info.
Parameters: max_tokens (completions default 16, chat default: until the end of the turn, at
most 1024 or what the context has left), temperature, top_p, stop, seed, n=1,
stream_options.include_usage, vLLM's ignore_eos and top_k, and logprobs: completions'
`logprobs: k` and `echo` (max_tokens 0 with echo scores the prompt only: what
lm-evaluation-harness sends), chat's `logprobs: true` and `top_logprobs: k`. A logprob is the
fp32 log-softmax of the logits the row's own model gives; virtual tokens, prefixes and the
BOS the server adds are never shown.

Under load: a bounded queue (a full one answers 503 with Retry-After), a limit on max_tokens
and on prompt plus answer against the context (400), and a request whose client has gone is
dropped from the queue or the batch.

Three parts, top to bottom: the request parser (JSON -> rows to decode, or a 4xx error),
the rows (tokens in, text deltas out), the application and the HTTP handler (one thread per
connection, which only waits on its rows' event queues, so a slow or vanished client never
holds up decoding). The scheduler, one thread that owns the model, is minipt/scheduler.py:
continuous batching by default, static batching with --scheduler static.
Standard library only for the HTTP side (http.server).
"""
import collections
import functools
import json
import logging
import math
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from .checkpoint import check_checkpoint, load_base, resolve_dtype
from .data import with_bos
from .devices import check_device
from .cli import ArgumentParser
from .generation import SettingError, check_context, check_sampling
from .packed import pack_for_decoding
from .prompts.mixed import PromptBank
from .scheduler import ContinuousScheduler, Overloaded, Scored, StaticScheduler

log = logging.getLogger("minipt.serve")

BASE_ID = "base"                 # the model id of the bare base model
COMPLETION_MAX_TOKENS = 16       # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 1024           # chat has no default in OpenAI's API (until the turn ends); cap it
MAX_BODY = 8 << 20               # bytes of request JSON
ROLES = ("system", "user", "assistant", "developer")
CLIENT_CHECK = 0.2               # seconds between checks that a waiting client is still connected


# ==== errors =================================================================================

class APIError(Exception):
    """An error the client gets as OpenAI's JSON body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, status=400, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ==== the request parser =====================================================================

def _field(body, key, types, default=None, required=False):
    """body[key] checked against types (bool is not a number here, as in JSON schema)."""
    if key not in body or body[key] is None:
        if required:
            raise APIError(f"'{key}' is required", param=key)
        return default
    value = body[key]
    if isinstance(value, bool) and bool not in types:
        raise APIError(f"'{key}' must be {types[0].__name__}, not a boolean", param=key)
    if not isinstance(value, types):
        raise APIError(f"'{key}' must be {' or '.join(t.__name__ for t in types)}, "
                       f"got {type(value).__name__}", param=key)
    return value


def _token_list(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in x)


def parse_request(body, chat: bool, app: "App") -> list["Row"]:
    """A completions / chat request -> its rows (one per prompt), checked, tokenised and
    placed against the context; an APIError (4xx) for anything the client got wrong."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = _field(body, "model", (str,), required=True)
    spec, extra = app.resolve_model(model)

    if _field(body, "n", (int,), 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    for key in ("tools", "functions", "response_format"):
        if body.get(key) not in (None, False):
            raise APIError(f"'{key}' is not supported by this server", param=key)
    top, echo = _logprob_fields(body, chat)
    if _field(body, "best_of", (int,), 1) != 1:
        raise APIError("only best_of=1 is supported", param="best_of")
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    if temperature > 2:  # OpenAI's range; the lower bound is generation.check_sampling's
        raise APIError("'temperature' must be between 0 and 2", param="temperature")
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    top_k = _field(body, "top_k", (int,))            # vLLM's extension; -1 (or absent): off
    top_k = None if top_k in (None, -1) else top_k
    seed = _field(body, "seed", (int,))
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    stream = _field(body, "stream", (bool,), False)
    options = _field(body, "stream_options", (dict,), {})
    include_usage = stream and bool(options.get("include_usage"))
    ignore_eos = _field(body, "ignore_eos", (bool,), False)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, (int,))
    limit = app.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(f"'{key}' is {max_tokens}, over this server's limit of {limit}", param=key)
    try:  # the settings' ranges, checked where generate.py and the library check them
        # max_tokens 0 with echo: only score the prompt (what evaluation harnesses send)
        check_sampling(1 if max_tokens is None or (echo and max_tokens == 0) else max_tokens,
                       temperature, top_k, top_p, stop)
    except SettingError as e:
        param = key if e.field == "max_new_tokens" else e.field
        raise APIError(str(e).replace("max_new_tokens", key), param=param) from None

    tok = app.tokenizer
    if chat:
        texts = [app.chat_prompt(_field(body, "messages", (list,), required=True))]
    else:
        texts = _field(body, "prompt", (str, list), required=True)
        if isinstance(texts, str) or _token_list(texts):
            texts = [texts]
        if not texts or not all(isinstance(p, str) or _token_list(p) for p in texts):
            raise APIError("'prompt' must be a string, a list of strings, a list of token ids "
                           "or a list of those", param="prompt")
        app.check_ids([t for p in texts if not isinstance(p, str) for t in p], "prompt")
    encoded = [tok.encode(p) if isinstance(p, str) else p for p in texts]
    # a string gets BOS where the model needs one (hidden from echo); token ids go in as given
    prompts = [with_bos(tok, e) if isinstance(p, str) else e for p, e in zip(texts, encoded)]
    if any(len(p) == 0 for p in prompts):
        raise APIError("the prompt is empty (it needs at least one token)",
                       param="prompt" if not chat else "messages")

    rows = []
    context = app.model_config.max_seq_len
    request = {"model": model, "chat": chat, "stream": stream, "include_usage": include_usage,
               "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "events": queue.Queue()}
    for index, ids in enumerate(prompts):
        room = context - extra - len(ids)
        n = (max_tokens if max_tokens is not None
             else COMPLETION_MAX_TOKENS if not chat else min(CHAT_MAX_TOKENS, limit, room))
        try:
            check_context(extra, len(ids), max(n, 1), context)
        except SettingError:
            raise APIError(f"this model's context is {context} tokens: the prompt takes {len(ids)}, "
                           f"the virtual tokens of {model!r} {extra}, which leaves {max(room, 0)} "
                           f"to generate, not {n}", param=key, code="context_length_exceeded") from None
        text = texts[index] if isinstance(texts[index], str) else tok.decode(ids)
        rows.append(Row(index=index, ids=ids, spec=spec, extra=extra, max_tokens=n, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                        eos=set() if ignore_eos else app.stop_ids(chat), request=request, decode=app.decode,
                        logprobs=top, echo=text if echo else None, hidden=len(ids) - len(encoded[index])))
    return rows


MAX_LOGPROBS = 20                # OpenAI's bound on top_logprobs (and legacy completions' logprobs)


def _logprob_fields(body, chat: bool) -> tuple:
    """(top-k alternatives per token, or None for no logprobs; echo) from a request: legacy
    completions' `logprobs: int` and `echo`, chat's `logprobs: bool` + `top_logprobs: int`."""
    if chat:
        if body.get("echo") not in (None, False):
            raise APIError("'echo' is for /v1/completions; chat does not echo its messages", param="echo")
        wanted = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,))
        if top is not None and not wanted:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        key, top = "top_logprobs", (top or 0) if wanted else None
    else:
        key, top = "logprobs", _field(body, "logprobs", (int,))
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'{key}' is {top}: must be in 0..{MAX_LOGPROBS}", param=key)
    return top, False if chat else _field(body, "echo", (bool,), False)


# ==== rows: one prompt's generation and its output events ====================================

class Row:
    """One prompt of a request in flight. The scheduler feeds it tokens; it turns them into
    text deltas on `events` (the queue the request's HTTP thread reads, shared by the rows
    of one request), holding back what might still become a stop string or is an unfinished
    UTF-8 character, and then a final ("done", ...) event. The row decides where it ends
    (EOS, stop string, max_tokens), so rows of one batch can each end differently.
    `cancelled` is set by the HTTP side once nobody reads the events any more.

    Logprobs: `logprobs` is None (none asked) or how many alternatives to give per token;
    the scheduler scores each token it feeds as a `Scored` (token, logprob, top), and they
    travel with the text deltas ("delta", index, text, [Scored, ...]). `echo` is the prompt's
    text to send first (None: no echo), scored from its second token on; the first `hidden`
    prompt tokens are the server's own (a BOS it added) and are neither echoed nor scored."""

    def __init__(self, *, index, ids, spec, extra, max_tokens, temperature, top_p, top_k, seed, stop, eos,
                 request, decode, logprobs=None, echo=None, hidden=0):
        self.index, self.ids, self.spec, self.extra, self.decode = index, ids, spec, extra, decode
        self.max_tokens, self.temperature, self.top_p, self.top_k = max_tokens, temperature, top_p, top_k
        self.seed = seed
        self.stop, self.eos = stop, eos
        self.logprobs, self.echo, self.hidden = logprobs, echo, hidden
        self.request = request
        self.events: "queue.Queue[tuple]" = request["events"]
        self.cancelled = threading.Event()
        self.text = ""            # decoded so far (complete characters)
        self.pending: list = []   # tokens whose bytes do not end a character yet
        self.sent = 0             # characters of text already sent as deltas
        self.scored: list = []    # Scored tokens not sent yet
        self.n_tokens = 0
        self.finished = False
        self.t_arrived, self.t_first = time.monotonic(), None   # for the latency figures of /stats

    @property
    def scores_prompt(self) -> bool:
        """Whether the scheduler must score the prompt's tokens (echo with logprobs)."""
        return self.echo is not None and self.logprobs is not None

    def start(self, prompt_scores=None) -> None:
        """After the prefill, before the first token: the echo, with `prompt_scores`, the Scored
        ids[1:] (given when scores_prompt)."""
        if self.echo is None:
            return
        scored = None
        if prompt_scores is not None:
            first = Scored(self.ids[self.hidden], None, None)
            scored = [first, *prompt_scores[self.hidden:]]
        self.events.put(("delta", self.index, self.echo, scored or []))

    def feed(self, token: int, scored=None) -> None:
        """One new token, with its Scored when logprobs were asked (the scheduler stops
        feeding once `finished`)."""
        if self.t_first is None:
            self.t_first = time.monotonic()
        if scored is not None and not (token in self.eos and self.request["chat"]):
            self.scored.append(scored)  # a completion shows its EOS (a harness counts it); chat does not
        if token in self.eos:
            return self.finish("stop")
        self.n_tokens += 1
        self.pending.append(token)
        piece = self.decode(self.pending)
        # byte-level BPE splits characters across tokens: wait (up to 4 bytes' worth) for the rest
        if not (piece.endswith("\ufffd") and len(self.pending) < 4):
            self.text += piece
            self.pending = []
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.pending = self.text[:at], []
                return self.finish("stop")
        if self.n_tokens >= self.max_tokens:
            return self.finish("length")
        # a stop string may be starting at the end: keep those characters back for now
        hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])),
                   default=0)
        self._send(len(self.text) - hold)

    def _send(self, upto: int, flush: bool = False) -> None:
        """The text up to `upto` and the tokens scored so far (every one of them when flushing)."""
        if upto > self.sent or (flush and self.scored):
            self.events.put(("delta", self.index, self.text[self.sent:upto], self.scored))
            self.sent, self.scored = upto, []

    def finish(self, reason: str) -> None:
        self.finished = True
        if self.pending:  # cut inside a character: send what there is (U+FFFD for the missing bytes)
            self.text += self.decode(self.pending)
            self.pending = []
        self._send(len(self.text), flush=True)
        self.events.put(("done", self.index, reason, len(self.ids), self.n_tokens))

    def fail(self, message: str, status=500, type="server_error", code=None) -> None:
        self.finished = True
        self.events.put(("error", self.index, APIError(message, status, type, code=code)))


# ==== the application: base, prompt folder, hot-plugging =====================================

class App:
    """The base model, its tokenizer, the PromptBank of the prompt folder's files and the
    scheduler. scheduler: "continuous" or "static" (minipt/scheduler.py); max_queue: rows
    that may wait before requests get a 503; prefill_chunk: prompt tokens prefilled between
    two decoding steps (continuous); window: how long a static batch waits for rows;
    max_tokens_limit: the most tokens one row may ask for (default: the context); prompt_states:
    prompts whose virtual tokens' keys and values are kept for reuse (continuous; 0: none)."""

    def __init__(self, base_dir, prompt_dir, dtype=torch.float32, device="cpu", max_batch=16, window=0.005,
                 packed=False, scheduler="continuous", max_queue=256, prefill_chunk=256,
                 max_tokens_limit=None, prompt_states=64):
        self.base, self.tokenizer = load_base(base_dir, dtype=dtype, device=device)
        if self.base.config.model_type != "gpt":
            raise ValueError(f"{base_dir}: serving needs a decoder-only model")
        if packed and pack_for_decoding(self.base) == 0:
            log.warning("%s holds no exact 4-bit codes: decoding in %s", base_dir, dtype)
        self.model_config = self.base.config
        self.bank = PromptBank(self.base)
        self.prompt_dir = Path(prompt_dir)
        self.files: dict[str, tuple] = {}    # name -> (path, mtime_ns, size) as loaded
        self.broken: dict[str, tuple] = {}   # name -> (mtime_ns, size) of a file that failed to load
        self.lock = threading.RLock()        # guards the bank and the file tables
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id or 0
        self.decode = lambda ids: tok.decode(ids, skip_special=True)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: tok.decode([i]))   # one token as text
        self.created = int(time.time())
        self.max_tokens_limit = max_tokens_limit or self.model_config.max_seq_len
        self.scan()
        if scheduler == "static":
            self.scheduler = StaticScheduler(self, max_batch, window, max_queue)
        elif scheduler == "continuous":
            self.scheduler = ContinuousScheduler(self, max_batch, max_queue, prefill_chunk, prompt_states)
        else:
            raise ValueError(f"scheduler={scheduler!r}: 'continuous' or 'static'")

    def scan(self) -> None:
        """Bring the bank in line with the folder: load new or changed files, drop removed
        ones. Called on every request; a stat per file, so cheap."""
        found = {}
        for path in self.prompt_dir.glob("*.safetensors"):
            name = path.stem
            if name.startswith(".") or "+" in name or name == BASE_ID:  # temp files of atomic saves; reserved
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found[name] = (path, st.st_mtime_ns, st.st_size)
        with self.lock:
            for name in list(self.files):
                if name not in found:
                    self.bank.remove(name)
                    del self.files[name]
                    log.info("prompt %s removed", name)
            for name, entry in found.items():
                if self.files.get(name) == entry or self.broken.get(name) == entry[1:]:
                    continue
                try:
                    self.bank.add(name, entry[0], self.tokenizer)
                except (ValueError, OSError, KeyError) as e:
                    self.broken[name] = entry[1:]
                    log.warning("prompt %s not served: %s", name, e)
                    if name in self.files:
                        self.bank.remove(name)
                        del self.files[name]
                    continue
                self.broken.pop(name, None)
                log.info("prompt %s %s", name, "reloaded" if name in self.files else "loaded")
                self.files[name] = entry

    def model_ids(self) -> list[str]:
        self.scan()
        with self.lock:
            return [BASE_ID, *self.bank.names]

    def resolve_model(self, model: str) -> tuple:
        """(the bank's row spec, the context its prompts take) for a model id, or a 404."""
        self.scan()
        if model == BASE_ID:
            return None, 0
        with self.lock:
            try:
                pieces = self.bank.resolve(model)
            except KeyError:
                pieces = None
            except ValueError as e:   # a composition the bank cannot build (two LoRAs)
                raise APIError(f"model {model!r}: {e}", param="model") from None
            if pieces is None:
                raise APIError(f"the model {model!r} does not exist "
                               f"(served: {', '.join([BASE_ID, *self.bank.names])}; "
                               f"'a+b' composes prompts)", 404, param="model", code="model_not_found")
        return model, (0 if pieces.vectors is None else len(pieces.vectors)) + pieces.position_offset

    def chat_prompt(self, messages) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_format", None) is None:
            raise APIError("this base model's tokenizer has no chat template: use /v1/completions")
        if not messages:
            raise APIError("'messages' must not be empty", param="messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise APIError(f"messages[{i}] needs a 'role' of {', '.join(ROLES)}", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string", param="messages")
            turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return tok.apply_chat_template(turns)

    def check_ids(self, ids, param: str) -> None:
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise APIError(f"token ids must be in [0, {vocab})", param=param)

    # ---- the tokenizer endpoints, as vLLM names them (lm-evaluation-harness's "remote" tokenizer)

    def tokenize(self, body) -> dict:
        """POST /tokenize {"prompt": text} or {"messages": [...]}: the ids this server would
        read. add_special_tokens (default true): BOS where the model starts with one."""
        tok = self.tokenizer
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        if "model" in body:
            self.resolve_model(_field(body, "model", (str,)))
        special = _field(body, "add_special_tokens", (bool,), True)
        if "messages" in body:
            ids = tok.encode(self.chat_prompt(_field(body, "messages", (list,))))
        else:
            ids = tok.encode(_field(body, "prompt", (str,), required=True))
        ids = with_bos(tok, ids) if special else ids
        out = {"count": len(ids), "max_model_len": self.model_config.max_seq_len, "tokens": ids}
        if _field(body, "return_token_strs", (bool,), False):
            out["token_strs"] = [self.token_text(i) for i in ids]
        return out

    def detokenize(self, body) -> dict:
        """POST /detokenize {"tokens": [ids]}: their text, special tokens included."""
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        ids = _field(body, "tokens", (list,), required=True)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError("'tokens' must be a list of token ids", param="tokens")
        self.check_ids(ids, "tokens")
        return {"prompt": self.tokenizer.decode(ids)}

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info: the special tokens and the chat template (as Jinja) the server
        applies to /v1/chat/completions."""
        tok = self.tokenizer
        text = lambda i: None if i is None else tok.decode([i])
        return {"tokenizer_class": f"minipt.{type(tok).__name__}",
                "chat_template": getattr(tok, "applied_chat_template", None),
                "bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id), "pad_token": text(tok.pad_id),
                "add_bos_token": bool(getattr(tok, "add_bos", False)),
                "model_max_length": self.model_config.max_seq_len, "vocab_size": self.model_config.vocab_size}

    def stop_ids(self, chat: bool) -> set:
        """Token ids that end a row: EOS, and in chat also the template's end of turn."""
        tok = self.tokenizer
        if chat:
            return tok.chat_stop_ids
        return {tok.eos_id} if tok.eos_id is not None else set()

    def stats(self) -> dict:
        """GET /stats. batch_sizes: rows per decoding step (continuous) or per batch (static)."""
        s = self.scheduler
        out = {"scheduler": s.name, "queued_rows": s.queued(), "running_rows": s.running_rows,
               "max_batch": s.max_batch, "max_queue": s.max_queue, **s.stats.snapshot()}
        if s.states is not None:
            out["prompt_states"] = s.states.snapshot()
        return out

    def close(self) -> None:
        self.scheduler.close()


# ==== the HTTP handler =======================================================================

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive for JSON replies; a stream closes its connection
    server_version = "minipt-serve"

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    # ---- replies

    def _json(self, status: int, obj, headers=None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError, headers=None) -> None:
        self._json(e.status, e.body(), headers)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path == "/v1/models":
                return self._json(200, {"object": "list",
                                        "data": [self._model(m) for m in self.app.model_ids()]})
            if path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                self.app.resolve_model(name)
                return self._json(200, self._model(name))
            if path == "/stats":
                return self._json(200, self.app.stats())
            if path == "/tokenizer_info":
                return self._json(200, self.app.tokenizer_info())
            if path == "/health":  # the scheduler thread is what can die
                alive = self.app.scheduler.thread.is_alive()
                return self._json(200 if alive else 503, {"status": "ok" if alive else "scheduler stopped"})
            raise APIError(f"no route GET {path}", 404, "not_found_error")
        except APIError as e:
            self._error(e)

    def _model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.app.created, "owned_by": "minipt"}

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            raw = self._read_body()  # read first, whatever the route: the connection stays usable
            tokenizer_route = {"/tokenize": self.app.tokenize, "/detokenize": self.app.detokenize}.get(path)
            if path not in ("/v1/completions", "/v1/chat/completions") and tokenizer_route is None:
                raise APIError(f"no route POST {path}", 404, "not_found_error")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(f"the request body is not valid JSON ({e})") from None
            if tokenizer_route is not None:
                return self._json(200, tokenizer_route(body))
            rows = parse_request(body, path == "/v1/chat/completions", self.app)
        except APIError as e:
            return self._error(e)
        except Exception as e:  # a bug here must not cost the client its answer
            log.exception("request failed")
            return self._error(APIError(f"internal error: {e}", 500, "server_error"))
        try:
            self.app.scheduler.submit(rows)
        except Overloaded as e:
            return self._error(APIError(str(e), 503, "server_error", code="overloaded"),
                               {"Retry-After": str(e.retry_after)})
        try:
            (self._stream if rows[0].request["stream"] else self._reply)(rows)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            log.info("client %s went away", self.address_string())
            self.close_connection = True
        finally:  # whatever happened here, the scheduler can drop these rows now
            for r in rows:
                r.cancelled.set()

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise APIError("bad Content-Length header") from None
        if length > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise APIError(f"request body over {MAX_BODY} bytes", 413)
        return self.rfile.read(length)

    # ---- completions: one reply at the end, or a stream of chunks

    def _events(self, rows):
        """The request's events (its rows share one queue) until every row is done or failed.
        While none come (queued, or a long prefill), it checks that the client is still there."""
        events, left, check = rows[0].events, len(rows), time.monotonic() + CLIENT_CHECK
        while left:
            try:
                ev = events.get(timeout=CLIENT_CHECK)
            except queue.Empty:
                ev = None
            if time.monotonic() >= check:  # a reply sent at the end writes nothing till then
                if self._client_gone():
                    raise ConnectionAbortedError("the client closed the connection")
                check = time.monotonic() + CLIENT_CHECK
            if ev is not None:
                left -= ev[0] != "delta"
                yield ev

    def _client_gone(self) -> bool:
        """The socket reads as closed (a client waits in silence; one that sends is still there)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    @staticmethod
    def _head(req, kind: str) -> dict:
        return {"id": req["id"], "object": kind, "created": int(time.time()), "model": req["model"],
                "system_fingerprint": None}

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _reply(self, rows) -> None:
        req = rows[0].request
        texts, reasons, usage = collections.defaultdict(str), {}, [0, 0]
        scored = collections.defaultdict(list)
        for ev in self._events(rows):
            if ev[0] == "error":
                return self._error(ev[2])
            if ev[0] == "delta":
                texts[ev[1]] += ev[2]
                scored[ev[1]] += ev[3]
            else:
                reasons[ev[1]] = ev[2]
                usage[0] += ev[3]
                usage[1] += ev[4]
        logprobs = lambda i: None if rows[i].logprobs is None else self._logprobs(scored[i], chat=req["chat"])
        if req["chat"]:
            head = self._head(req, "chat.completion")
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                        "logprobs": logprobs(0), "finish_reason": reasons[0]}]
        else:
            head = self._head(req, "text_completion")
            choices = [{"index": i, "text": texts[i], "logprobs": logprobs(i), "finish_reason": reasons[i]}
                       for i in range(len(rows))]
        self._json(200, {**head, "choices": choices, "usage": self._usage(*usage)})

    def _logprobs(self, scored, chat: bool, offset: int = 0) -> dict:
        """Scored tokens in the OpenAI shape: chat's {"content": [{token, logprob, bytes,
        top_logprobs}]}, or legacy completions' {tokens, token_logprobs, top_logprobs (the top k
        and the chosen token), text_offset (into the choice's text, from `offset`)}."""
        text = self.app.token_text
        if chat:
            entry = lambda t, lp: {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}
            return {"content": [{**entry(s.token, s.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scored]}
        tokens = [text(s.token) for s in scored]
        offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in scored],
                "top_logprobs": [None if s.top is None else {**{text(t): lp for t, lp in s.top},
                                                             text(s.token): s.logprob} for s in scored],
                "text_offset": offsets}

    def _stream(self, rows) -> None:
        """Server-sent events: one chunk per text delta (with its tokens' logprobs when asked),
        one with each row's finish_reason, optionally one with the usage, then `data: [DONE]`."""
        req, chat = rows[0].request, rows[0].request["chat"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no length known: the end of the stream ends the connection
        self.end_headers()
        self.close_connection = True
        head = self._head(req, "chat.completion.chunk" if chat else "text_completion")
        offsets = collections.Counter()   # characters each choice has streamed so far

        def send(obj) -> None:  # raises BrokenPipeError & co. when the client has gone: see do_POST
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(index, text=None, reason=None, role=None, scored=None) -> dict:
            logprobs = None
            if scored is not None and rows[index].logprobs is not None:
                logprobs = self._logprobs(scored, chat, offsets[index])
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": role, **delta}
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            offsets[index] += sum(len(self.app.token_text(s.token)) for s in scored or [])
            return {**head, "choices": [choice]}

        if chat:
            send(chunk(0, "", role="assistant"))
        usage = [0, 0]
        for ev in self._events(rows):
            if ev[0] == "error":
                send(ev[2].body())
                break
            if ev[0] == "delta":
                send(chunk(ev[1], ev[2], scored=ev[3]))
            else:
                send(chunk(ev[1], reason=ev[2]))
                usage[0] += ev[3]
                usage[1] += ev[4]
        if req["include_usage"]:
            send({**head, "choices": [], "usage": self._usage(*usage)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of more clients connecting at once
    # overflowed the accept queue and some got "connection reset" (tests/test_serve_load.py)
    request_queue_size = 1024

    def __init__(self, address, app: App):
        self.app = app
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self):
        super().server_close()
        self.app.close()


def make_server(base_dir, prompt_dir, host="127.0.0.1", port=8000, dtype=torch.float32, device="cpu",
                max_batch=16, window=0.005, packed=False, **options) -> Server:
    """The server, bound and ready for serve_forever() (port 0 picks a free port; see .url).
    options: App's scheduler, max_queue, prefill_chunk, max_tokens_limit."""
    app = App(base_dir, prompt_dir, dtype, device, max_batch, window, packed, **options)
    return Server((host, port), app)


def parse_args(argv=None):
    ap = ArgumentParser(prog="python -m minipt.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="minipt checkpoint directory (see weights/)")
    ap.add_argument("--prompts", required=True,
                    help="folder of prompt files, watched: NAME.safetensors is model NAME")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: float32 with --packed, else bfloat16 where the hardware has it")
    ap.add_argument("--packed", action="store_true",
                    help="CPU: decode from the 4-bit codes of a checkpoint converted from GGUF Q4_1 "
                         "(minipt.packed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=16, help="most rows decoded in one batch")
    ap.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                    help="continuous: rows join and leave the batch at every step; static: a batch "
                         "runs until its longest row ends")
    ap.add_argument("--max-queue", type=int, default=256,
                    help="rows that may wait for a place; past that, requests get 503 and Retry-After")
    ap.add_argument("--prompt-states", type=int, default=64,
                    help="continuous: prompts (and compositions) whose virtual tokens' keys and values "
                         "are kept for the next request (least recently used go first; 0: none)")
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="continuous: prompt tokens prefilled between two decoding steps")
    ap.add_argument("--max-tokens-limit", type=int, default=None,
                    help="the most new tokens one row may ask for (default: what the context allows)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0,
                    help="static: how long the first queued request waits for others to join its batch")
    return ap.parse_args(argv)


def check_args(args) -> None:
    """Every option checked before the model loads."""
    if not Path(args.prompts).is_dir():
        raise ValueError(f"--prompts {args.prompts}: not a folder")
    if args.packed and (args.dtype == "bfloat16" or args.device != "cpu"):
        raise ValueError("--packed decodes on the CPU from float32 weights (drop --dtype/--device)")
    check_device(args.device, f"--device {args.device}", "--device cpu")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    for name in ("max_batch", "max_queue", "prefill_chunk", "max_tokens_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.prompt_states < 0:
        raise ValueError(f"--prompt-states {args.prompt_states}: must be at least 0 (0: keep none)")
    if not (math.isfinite(args.batch_window_ms) and args.batch_window_ms >= 0):
        raise ValueError(f"--batch-window-ms {args.batch_window_ms}: must be a finite number >= 0")
    check_checkpoint(args.base)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        check_args(args)
        dtype = resolve_dtype(args.dtype or ("float32" if args.packed else "auto"), args.device)
        server = make_server(args.base, args.prompts, args.host, args.port, getattr(torch, dtype),
                             args.device, args.max_batch, args.batch_window_ms / 1000, args.packed,
                             scheduler=args.scheduler, max_queue=args.max_queue,
                             prefill_chunk=args.prefill_chunk, max_tokens_limit=args.max_tokens_limit,
                             prompt_states=args.prompt_states)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    log.info("serving %s on %s/v1", ", ".join(server.app.model_ids()), server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
