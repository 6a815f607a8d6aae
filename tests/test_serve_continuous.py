"""Continuous batching (minipt/scheduler.py) and the server under pressure: rows joining and
leaving a running batch each get what `generate` gives them alone, whatever their prompt
method; a request that arrives mid-batch starts before the batch ends (and, with the static
scheduler, does not); a full queue answers 503 without touching the running rows; a client
that goes away is dropped; /stats reports the load; bad settings get a 400 naming the field.
The tiny base and prompt files of test_serve.py."""
import contextlib
import http.client
import json
import random
import threading
import time

import pytest
import torch
from test_serve import TEXTS, base_dir, oracle, prompt_dir, running  # noqa: F401 (fixtures)

from minipt import scheduler as scheduler_module
from minipt.checkpoint import load_base
from minipt.generation import decode_steps, generate
from minipt.prompts import PromptConfig, attach, load, save
from minipt.prompts.mixed import MIXABLE, PromptBank
from minipt.serve import App, make_server, parse_request

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def every_method(base_dir, tmp_path_factory):
    """A prompt file per mixable method (soft prompt, P-tuning, prefix, P-tuning v2, adapter
    with open gates), each of its own length."""
    folder = tmp_path_factory.mktemp("every-method")
    for seed, method in enumerate(MIXABLE):
        base, tok = load_base(base_dir)
        cfg = PromptConfig.for_method(method, num_virtual_tokens=2 + seed, init="random", seed=seed,
                                      encoder_hidden=16, projection_hidden=24, adapter_layers=2)
        model = attach(base, cfg, tok)
        with torch.no_grad():
            if method == "adapter":
                model.method.gates.uniform_(-1, 1)
            if method == "lora":                 # B starts at zero: give the update something to add
                for p in model.method.lora_B.values():
                    p.normal_(0, 0.1)
            for p in model.method.parameters():  # larger than init, so the prompts steer the model
                p.mul_(4)
        save(model, folder / f"{method}.safetensors", tok)
    return folder


def collect(rows) -> list:
    """Each row's (text, finish reason) from its events, once every row is done."""
    texts, reasons, left = {r.index: "" for r in rows}, {}, len(rows)
    while left:
        ev = rows[0].events.get(timeout=120)
        if ev[0] == "error":
            raise AssertionError(ev[2].message)
        if ev[0] == "delta":
            texts[ev[1]] += ev[2]
        else:
            reasons[ev[1]] = ev[2]
            left -= 1
    return [(texts[i], reasons[i]) for i in sorted(texts)]


def test_rows_joining_a_running_batch_equal_generate_alone(base_dir, every_method, monkeypatch):
    """40 requests over every method, compositions and the bare base, with prompts of 1 to
    30 tokens and 1 to 40 new tokens, arriving at random moments into a batch of at most 6:
    rows join and leave at every step, the cache is laid out anew often (a tiny headroom),
    long prompts are prefilled in chunks of 8. Greedy rows get `generate`'s answer with
    their prompt alone; seeded sampled rows get decode_steps' on their own."""
    layouts = []
    new_caches = scheduler_module._new_caches
    monkeypatch.setattr(scheduler_module.Timeline, "HEADROOM", 2)
    monkeypatch.setattr(scheduler_module, "_new_caches",
                        lambda base, b, w: layouts.append((b, w)) or new_caches(base, b, w))
    app = App(base_dir, every_method, max_batch=6, prefill_chunk=8)
    rng = random.Random(0)
    models = ["base", *MIXABLE, "prompt_tuning+prefix_tuning", "p_tuning+adapter", "p_tuning_v2+adapter",
              "lora+prompt_tuning"]
    jobs = []
    for i in range(40):
        text = "".join(rng.choice("abcdefghij klmnop,.") for _ in range(rng.randint(1, 30)))
        sampled = i % 7 == 3
        jobs.append({"model": rng.choice(models), "prompt": text, "max_tokens": rng.randint(1, 40),
                     "temperature": 0.8 if sampled else 0, "seed": i, "top_p": 0.9 if sampled else 1})
    try:
        requests = []
        for body in jobs:
            rows = parse_request(body, False, app)
            app.scheduler.submit(rows)
            requests.append(rows)
            time.sleep(rng.random() * 0.004)
        answers = [collect(rows)[0] for rows in requests]
        stats = app.stats()
    finally:
        app.close()

    base, tok = load_base(base_dir)
    bank = PromptBank(base)
    for m in MIXABLE:
        bank.add(m, every_method / f"{m}.safetensors", tok)
    for body, (text, reason) in zip(jobs, answers):
        ids, n = tok.encode(body["prompt"]), body["max_tokens"]
        if body["temperature"]:
            out = []
            for step in decode_steps(bank.for_rows([body["model"]] if body["model"] != "base" else [None]),
                                     [ids], n, temperature=0.8, top_p=0.9, seed=body["seed"], eos_id=2,
                                     pad_id=2):
                out += [t for t in step if t != 2]
        else:
            model = base
            if "+" in body["model"]:
                model = bank.for_rows([body["model"]])
            elif body["model"] == "lora":   # onto a base of its own: the bank's is shared
                model = load(every_method / "lora.safetensors", load_base(base_dir)[0], tok)
            elif body["model"] != "base":
                model = load(every_method / f"{body['model']}.safetensors", base, tok)
            out = generate(model, [ids], n, eos_id=2, pad_id=2)[0]
        assert text == tok.decode(out, skip_special=True), body
        assert reason == ("length" if len(out) == n else "stop"), body
    sizes = {int(k) for k in stats["batch_sizes"]}
    assert max(sizes) >= 4, stats            # rows did share steps
    assert len(layouts) > 10, layouts        # and the cache was laid out anew many times
    assert stats["running_rows"] == 0 and stats["queued_rows"] == 0


# ---- the server -------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(base_dir, prompt_dir, **options):
    """The server's host:port while it runs."""
    with running(make_server(base_dir, prompt_dir, port=0, **options)) as server:
        yield server.url.split("//")[1]


def request(host, body, path="/v1/completions"):
    """(status, headers, parsed body) of one POST."""
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def get(host, path):
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class Stream:
    """A streamed completion read in a thread: the time of each text chunk and of the end."""

    def __init__(self, host, body):
        self.times, self.text, self.end = [], "", None
        self.conn = http.client.HTTPConnection(host, timeout=120)
        self.conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.resp:
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: "):
                self.text += json.loads(line[6:])["choices"][0]["text"]
                self.times.append(time.monotonic())
        self.end = time.monotonic()

    def wait(self):
        self.thread.join(120)
        self.conn.close()
        return self


LONG = {"model": "soft", "prompt": "x", "max_tokens": 600, "ignore_eos": True, "temperature": 0}


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_logprobs_of_every_method_in_one_batch_equal_each_row_alone(base_dir, every_method, scheduler):
    """Echoed prompts and generated tokens, scored for rows of every method (LoRA and a
    composition with it too) decoded together: the log-softmax of each row's logits alone."""
    app = App(base_dir, every_method, max_batch=16, prefill_chunk=5, scheduler=scheduler, window=0.5)
    models = ["base", *MIXABLE, "lora+prompt_tuning", "p_tuning_v2+adapter"]
    prompts = [[3 + (7 * i + j) % 110 for j in range(4 + i)] for i in range(len(models))]
    try:
        requests = [parse_request({"model": m, "prompt": p, "max_tokens": 5, "logprobs": 2, "echo": True,
                                   "ignore_eos": True, "temperature": 0}, False, app)
                    for m, p in zip(models, prompts)]
        for rows in requests:
            app.scheduler.submit(rows)
        scored = []
        for rows in requests:
            got = []
            while (ev := rows[0].events.get(timeout=120))[0] != "done":
                got += ev[3]
            scored.append(got)
    finally:
        app.close()
    bank = PromptBank(load_base(base_dir)[0])
    for m in MIXABLE:
        bank.add(m, every_method / f"{m}.safetensors")
    for model, ids, got in zip(models, prompts, scored):
        full = torch.tensor([ids + [s.token for s in got[len(ids):]]])
        assert full.size(1) == len(ids) + 5 and got[0].logprob is None
        with torch.no_grad():   # the row alone: its file on a fresh base, a composition in a batch of one
            if "+" in model:
                logits = bank(full, rows=[model])[0]
            else:
                base, tok = load_base(base_dir)
                alone = base if model == "base" else load(every_method / f"{model}.safetensors", base, tok)
                logits = alone(full)[0]
        expected = logits[0, :-1].float().log_softmax(-1).gather(-1, full[0, 1:, None])[:, 0]
        assert (torch.tensor([s.logprob for s in got[1:]]) - expected).abs().max() < 1e-4, (scheduler, model)


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_a_request_arriving_mid_batch_starts_before_the_batch_ends(base_dir, prompt_dir, oracle, scheduler):
    """A long row decodes; a short request sent after its 20th token gets its first token
    (and its whole answer) while the long row is still running. The static scheduler, where
    the short request waits for the next batch, is the contrast: there it starts after."""
    with serving(base_dir, prompt_dir, scheduler=scheduler) as host:
        long = Stream(host, LONG)
        while len(long.times) < 20:
            time.sleep(0.001)
        short = Stream(host, {"model": "prefix", "prompt": TEXTS[1], "max_tokens": 5,
                              "temperature": 0}).wait()
        long.wait()
    assert short.text == oracle("prefix", TEXTS[1], 5)[0]
    assert long.text == oracle_ignoring_eos(base_dir, prompt_dir, "soft", "x", 600)
    if scheduler == "continuous":
        assert short.times[0] < short.end < long.end
        tokens_before = sum(t < short.times[0] for t in long.times)
        assert tokens_before < 300, tokens_before         # it joined near where it came in
    else:
        assert short.times[0] > long.end


def test_a_full_queue_answers_503_and_spares_the_running_rows(base_dir, prompt_dir, oracle):
    """One slot (max_batch 1) and a queue of two: a long row runs, two requests wait, the
    next one gets a 503 with Retry-After at once, and the three others get their answers."""
    with serving(base_dir, prompt_dir, max_batch=1, max_queue=2) as host:
        long = Stream(host, LONG)
        while not long.times:
            time.sleep(0.001)
        waiting, replies = [("ptune", TEXTS[0]), ("base", TEXTS[3])], {}
        threads = [threading.Thread(target=lambda m, t: replies.__setitem__(
            m, request(host, {"model": m, "prompt": t, "max_tokens": 6, "temperature": 0})), args=job)
            for job in waiting]
        for t in threads:
            t.start()
        while get(host, "/stats")["queued_rows"] < 2:
            time.sleep(0.001)
        t0 = time.monotonic()
        status, headers, body = request(host, {"model": "soft", "prompt": "hi", "max_tokens": 3})
        refused_in = time.monotonic() - t0
        assert long.end is None, "the long row should still be running"
        for t in threads:
            t.join(120)
        long.wait()
        stats = get(host, "/stats")
    assert status == 503 and body["error"]["code"] == "overloaded"
    assert "queue is full" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1 and refused_in < 5
    assert long.text == oracle_ignoring_eos(base_dir, prompt_dir, "soft", "x", 600)
    for model, text in waiting:
        assert replies[model][0] == 200
        assert replies[model][2]["choices"][0]["text"] == oracle(model, text, 6)[0]
    assert stats["rejected_requests"] == 1 and stats["queued_rows"] == 0


def oracle_ignoring_eos(base_dir, prompt_dir, name, text, n):
    base, tok = load_base(base_dir)
    out = generate(load(prompt_dir / f"{name}.safetensors", base, tok), [tok.encode(text)], n, pad_id=2)[0]
    return tok.decode(out, skip_special=True)


def stats_once_cancelled(host, before=0):
    """/stats once it counts more than `before` cancelled rows, or after about 2 s."""
    for _ in range(200):
        stats = get(host, "/stats")
        if stats["cancelled_rows"] > before:
            break
        time.sleep(0.01)
    return stats


def test_a_client_gone_without_a_stream_is_dropped(base_dir, prompt_dir):
    """A plain (not streamed) request whose client closes its socket while the row decodes:
    the handler notices (no write needed) and the row leaves the batch long before its end."""
    with serving(base_dir, prompt_dir) as host:
        before = get(host, "/stats")
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**LONG, "max_tokens": 1000}),
                     {"Content-Type": "application/json"})
        while get(host, "/stats")["running_rows"] == 0:
            time.sleep(0.001)
        conn.close()
        stats = stats_once_cancelled(host, before["cancelled_rows"])
    assert stats["cancelled_rows"] == before["cancelled_rows"] + 1, json.dumps(stats)
    assert stats["generated_tokens"] - before["generated_tokens"] < 1000
    assert stats["running_rows"] == 0


def test_stats_show_the_load(base_dir, prompt_dir):
    with serving(base_dir, prompt_dir) as host:
        for n in (3, 8, 12):
            assert request(host, {"model": "soft", "prompt": "hello", "max_tokens": n})[0] == 200
        stats = get(host, "/stats")
        health = get(host, "/health")
    assert health == {"status": "ok"}
    assert stats["scheduler"] == "continuous" and stats["queued_rows"] == 0 and stats["running_rows"] == 0
    assert stats["generated_tokens"] >= 3 and stats["tokens_per_s"] > 0
    for kind in ("first_token", "per_token", "request"):
        p = stats["latency_ms"][kind]
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"], stats


BAD_SETTINGS = [({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"),
                ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
                ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 51}, "max_tokens")]


def test_bad_settings_get_a_400_naming_the_field(base_dir, prompt_dir):
    with serving(base_dir, prompt_dir, max_tokens_limit=50) as host:
        for extra, field in BAD_SETTINGS:
            status, _, body = request(host, {"model": "soft", "prompt": "x", **extra})
            assert status == 400 and body["error"]["param"] == field, (extra, body)
            assert field in body["error"]["message"], body
        status, _, body = request(host, {"model": "soft", "prompt": "x", "max_tokens": 50, "top_k": 3,
                                         "temperature": 0.5, "seed": 1})
        assert status == 200 and body["usage"]["completion_tokens"] <= 50


def test_a_client_gone_while_queued_never_runs(base_dir, prompt_dir):
    """One slot, taken by a long row; a plain request queues behind it and its client
    leaves: the row is dropped when its turn comes, without a token."""
    with serving(base_dir, prompt_dir, max_batch=1) as host:
        long = Stream(host, LONG)
        while not long.times:
            time.sleep(0.001)
        conn = http.client.HTTPConnection(host, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**LONG, "max_tokens": 300}),
                     {"Content-Type": "application/json"})
        while get(host, "/stats")["queued_rows"] == 0:
            time.sleep(0.001)
        conn.close()
        long.wait()
        stats = stats_once_cancelled(host)
    assert stats["cancelled_rows"] == 1 and stats["generated_tokens"] == 600, json.dumps(stats)


def test_a_failing_step_fails_its_rows_and_the_server_goes_on(base_dir, prompt_dir, monkeypatch):
    """A decoding step that raises: the rows in flight get a 500, the next request its answer."""
    calls = []
    step = scheduler_module.Timeline.step

    def broken(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return step(self)
    monkeypatch.setattr(scheduler_module.Timeline, "step", broken)
    ask = {"model": "soft", "prompt": "hi", "max_tokens": 10, "ignore_eos": True}
    with serving(base_dir, prompt_dir) as host:
        status, _, body = request(host, ask)
        assert status == 500 and "injected" in body["error"]["message"]
        status, _, body = request(host, ask)
        assert status == 200 and body["usage"]["completion_tokens"] == 10
        assert get(host, "/health") == {"status": "ok"}
