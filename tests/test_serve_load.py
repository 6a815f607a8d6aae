"""The server under load: `python -m minipt.serve` in its own process (so its memory is its
own), the tiny model and prompt files of test_serve.py, and 48 client threads sending rounds
of good requests (completions, streams, chat, prompt lists), malformed ones (bad JSON, unknown
models, wrong types, oversize) and clients that hang up mid-stream, all shuffled together.

Every good request must get exactly what `generate` gives its prompt alone, every bad one a
4xx with an OpenAI-style error, the server must log no exception, stay healthy, let go of its
handler threads, and its resident memory must not grow from round to round after a warm-up.
"""
import collections
import concurrent.futures
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest
from test_serve import TEXTS, base_dir, oracle, prompt_dir  # noqa: F401  (fixtures: tiny base, three prompts)

from minipt.checkpoint import load_base
from minipt.generation import generate
from minipt.prompts.mixed import PromptBank

THREADS = 48
ROUNDS = 12                 # the first is the warm-up
MODELS = ["base", "soft", "ptune", "prefix", "soft+prefix"]
MAX_TOKENS = (3, 8)
# Resident memory is sampled after every round. Its growth: the lowest of the last three
# rounds minus the lowest of the three after the warm-up round (the lowest, because the
# allocator's transient peaks add up to ~5 MiB of noise to any single sample), 8 rounds apart.
# Measured: 0.5-2 MiB (of ~315 MiB), flat. Leaking each request's rows (Row, event queue,
# request dict: ~12 kB a request) added ~2 MiB a round; the bound catches any leak over
# ~4 kB a request.
RSS_GROWTH_BOUND = 6 << 20


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def served(base_dir, prompt_dir):
    """(process, base url, log lines) of `python -m minipt.serve` on a free loopback port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: one thread per matmul is fastest
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "minipt.serve", "--base", str(base_dir),
                             "--prompts", str(prompt_dir), "--port", "0", "--dtype", "float32",
                             "--max-batch", "16"],
                            cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    lines, ready = collections.deque(maxlen=100_000), threading.Event()

    def drain():  # the server logs every request: keep reading so its stderr pipe never fills
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if " on http://" in line:
                ready.set()
    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(120), "server did not start:\n" + "\n".join(lines)
        url = re.search(r"on (http://\S+)/v1", next(l for l in lines if " on http://" in l)).group(1)
        yield proc, url, lines
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def expected(base_dir, prompt_dir, oracle):
    """(kind, model, text, max_tokens) -> the text `generate` gives with the prompt alone."""
    base, tok = load_base(base_dir)
    bank = PromptBank(base)
    for n in ("soft", "prefix"):
        bank.add(n, prompt_dir / f"{n}.safetensors", tok)

    def composed(text, n):  # "soft+prefix": the bank on one row (test_mixed checks composition itself)
        out = generate(bank.for_rows(["soft+prefix"]), [tok.encode(text)], n, eos_id=2, pad_id=2)[0]
        return tok.decode(out, skip_special=True)
    table = {}
    for model in MODELS:
        for text in TEXTS:
            for n in MAX_TOKENS:
                table["text", model, text, n] = (composed(text, n) if "+" in model
                                                 else oracle(model, text, n)[0])
                if "+" not in model:
                    table["chat", model, text, n] = oracle(model, text, n, chat=True)[0]
    return table


# ---- the requests ------------------------------------------------------------------------------

def post(url, path, body: bytes, headers=None, timeout=60):
    """(status, parsed JSON) of one POST on its own connection."""
    host = url.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def oversize(url):
    """A Content-Length over the server's 8 MiB limit: refused before the body is read."""
    host = url.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(9 << 20))
        conn.endheaders(b'{"model": "base", "prompt": "')
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [  # (path, body, status); JSON bodies are dumped, bytes sent as they are
    (C, b"{not json", 400), (C, b"\xff\xfe\x00", 400), (C, b"[1, 2]", 400), (C, b"", 400),
    (C, {"model": "nope", "prompt": "x"}, 404), (C, {"model": "soft+nope", "prompt": "x"}, 404),
    (C, {"model": 7, "prompt": "x"}, 400), (C, {"model": "soft", "prompt": [1.5]}, 400),
    (C, {"model": "soft", "prompt": [999]}, 400),
    (C, {"model": "soft", "prompt": "x", "max_tokens": "5"}, 400),
    (C, {"model": "soft", "prompt": "x", "temperature": "hot"}, 400),
    (C, {"model": "soft", "prompt": {"a": 1}}, 400),
    (C, {"model": "soft", "prompt": "x", "stream": "yes"}, 400),
    (C, {"model": "soft", "prompt": "x" * 1000, "max_tokens": 100}, 400),            # over the context
    (CHAT, {"model": "soft", "messages": "hi"}, 400),
    (CHAT, {"model": "soft", "messages": [{"role": "robot"}]}, 400),
    (CHAT, {"model": "soft", "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/nothing", {"model": "soft"}, 404),
]


def good_job(client, expected, rng):
    kind = rng.choice(["completion", "completion", "stream", "chat", "list"])
    model = rng.choice(MODELS if kind != "chat" else MODELS[:4])
    text, n = rng.choice(TEXTS), rng.choice(MAX_TOKENS)

    def run():
        if kind == "chat":
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                               max_tokens=n, temperature=0)
            return r.choices[0].message.content == expected["chat", model, text, n]
        if kind == "list":
            texts = rng.sample(TEXTS, 2)
            r = client.completions.create(model=model, prompt=texts, max_tokens=n, temperature=0)
            return [c.text for c in r.choices] == [expected["text", model, t, n] for t in texts]
        if kind == "stream":
            chunks = client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in chunks if c.choices) == expected["text", model, text, n]
        r = client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0)
        return r.choices[0].text == expected["text", model, text, n]
    return f"good {kind} {model} {text!r} {n}", run


def bad_job(url, rng):
    if rng.random() < 0.1:
        return "bad oversize", lambda: oversize(url)[0] == 413
    path, body, status = rng.choice(BAD)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    def run():
        got, reply = post(url, path, data)
        return got == status and set(reply) == {"error"} and bool(reply["error"]["message"])
    return f"bad {data[:60]!r} -> {status}", run


def hang_up_job(url):
    """A long stream (ignore_eos, 1000 tokens) whose client leaves after the first event."""
    def run():
        conn = http.client.HTTPConnection(url.split("//")[1], timeout=60)
        conn.request("POST", "/v1/completions",
                     json.dumps({"model": "soft", "prompt": "x", "max_tokens": 1000, "stream": True,
                                 "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        ok = resp.status == 200 and resp.fp.readline().startswith(b"data: ")
        resp.close()
        conn.close()
        return ok
    return "hang-up", run


def one_round(url, client, expected, seed, n_good=140, n_bad=50, n_hang_up=10):
    """Send one shuffled round from THREADS threads; (failures, latencies of the good ones)."""
    rng = random.Random(seed)
    jobs = ([good_job(client, expected, rng) for _ in range(n_good)]
            + [bad_job(url, rng) for _ in range(n_bad)]
            + [hang_up_job(url) for _ in range(n_hang_up)])
    rng.shuffle(jobs)
    latencies = []

    def timed(job):
        name, run = job
        t0 = time.monotonic()
        try:
            ok = run()
        except Exception as e:  # noqa: BLE001  any client-side error is a failure of this request
            return f"{name}: {type(e).__name__}: {e}"
        if name.startswith("good"):
            latencies.append(time.monotonic() - t0)
        return None if ok else f"{name}: wrong answer"
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        failures = [f for f in pool.map(timed, jobs) if f]
    return failures, latencies


# ---- the test ----------------------------------------------------------------------------------

def get(url, path):
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_server_under_load(served, expected):
    proc, url, log_lines = served
    server = psutil.Process(proc.pid)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    threads_idle = server.num_threads()
    rss, all_latencies, t_start = [], [], time.monotonic()
    for round_ in range(ROUNDS):
        failures, latencies = one_round(url, client, expected, seed=round_)
        assert not failures, f"round {round_}: {len(failures)} failed, e.g.\n" + "\n".join(failures[:10])
        assert proc.poll() is None, "the server died"
        rss.append(server.memory_info().rss)
        all_latencies += latencies
    elapsed = time.monotonic() - t_start
    client.close()

    # healthy and idle: nothing queued, every hang-up noticed, no exception logged
    assert get(url, "/health") == (200, {"status": "ok"})
    stats = get(url, "/stats")[1]
    assert stats["queued_rows"] == 0
    assert stats["cancelled_rows"] >= ROUNDS * 10, stats
    errors = [line for line in log_lines if "Traceback" in line or "ERROR" in line or "Exception" in line]
    assert not errors, "\n".join(errors[:20])
    # handler threads end with their connections (a stuck one would wait on its rows forever)
    for _ in range(100):
        if server.num_threads() <= threads_idle + 2:
            break
        time.sleep(0.1)
    assert server.num_threads() <= threads_idle + 2, (threads_idle, server.num_threads())

    growth = min(rss[-3:]) - min(rss[1:4])
    all_latencies.sort()
    print(f"\n{ROUNDS} rounds of 200 requests in {elapsed:.1f} s; batches {stats['batch_sizes']}; "
          f"good-request latency p50 {all_latencies[len(all_latencies) // 2] * 1000:.0f} ms, "
          f"max {all_latencies[-1] * 1000:.0f} ms; "
          f"server RSS after each round (MiB): {', '.join(f'{r / 2**20:.1f}' for r in rss)}; "
          f"growth {growth / 2**20:+.2f} MiB")
    assert growth < RSS_GROWTH_BOUND, [r / 2**20 for r in rss]
