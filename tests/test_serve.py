"""The OpenAI-compatible server (minipt/serve.py), driven by the real `openai` client over
loopback: a tiny random llama-style decoder with a 120-token byte-level vocabulary and three
prompt files. Every served answer is checked against `generate` on the prompt file loaded
alone (PromptedModel, not the PromptBank the server batches with)."""
import contextlib
import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from safetensors.torch import save_file

from minipt.checkpoint import load_base
from minipt.config import GPTConfig, save_config
from minipt.generation import decode_steps, generate
from minipt.gpt import GPT
from minipt.prompts import PromptConfig, PromptMethod, PromptedModel, attach, load, save
from minipt.serve import make_server
from minipt.tokenizer import BPETokenizer, _spell

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello there", "The capital of France is", "a", "1, 2, 3,",
         "Once upon a time, in a village by the sea"]
METHODS = {"soft": dict(method="prompt_tuning", num_virtual_tokens=4),
           "ptune": dict(method="p_tuning", num_virtual_tokens=3, encoder_hidden=16),
           "prefix": dict(method="prefix_tuning", num_virtual_tokens=3, projection_hidden=24)}


def tiny_tokenizer() -> BPETokenizer:
    """ChatML specials at 0-2, then 117 single bytes (tab, newline, printable ASCII, a few
    control characters): every id a 120-token model can produce decodes to ASCII."""
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    byte_values = [9, 10, *range(32, 127), *range(0, 9), *range(11, 22)]
    vocab = {_spell(bytes([b])): 3 + i for i, b in enumerate(byte_values)}
    return BPETokenizer({**vocab, **specials}, [], specials, bos_id=1, eos_id=2, chat_template=CHATML)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A minipt checkpoint directory: random llama-style weights (GQA, RoPE, SwiGLU) at
    PyTorch's default init, whose logits are spread enough that greedy picks have clear
    winners (batched and single rows round differently in the last bits)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=120, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                    intermediate_size=64, max_seq_len=1024, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qkv_bias=False, proj_bias=False, tie_embeddings=False, source="llama")
    directory = tmp_path_factory.mktemp("base")
    save_config(cfg, directory)
    save_file({k: v.contiguous() for k, v in GPT(cfg).state_dict().items()}, directory / "model.safetensors")
    tiny_tokenizer().save(directory)
    return directory


def make_prompt(base_dir, path, method, seed):
    base, tok = load_base(base_dir)
    model = attach(base, PromptConfig(init="random", seed=seed, **METHODS[method]), tok)
    with torch.no_grad():
        for p in model.method.parameters():  # larger than init, so the prompts visibly steer the model
            p.mul_(4)
    return save(model, path, tok)


@pytest.fixture(scope="module")
def prompt_dir(base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    for seed, name in enumerate(METHODS):
        make_prompt(base_dir, folder / f"{name}.safetensors", name, seed)
    return folder


@contextlib.contextmanager
def running(server):
    """`server` answering on a thread for the duration, then shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(base_dir, prompt_dir):
    with running(make_server(base_dir, prompt_dir, port=0, max_batch=16, window=0.005)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def static_server(base_dir, prompt_dir):
    """The same, with the static scheduler (--scheduler static)."""
    with running(make_server(base_dir, prompt_dir, port=0, max_batch=16, window=0.005,
                             scheduler="static")) as server:
        yield server


@pytest.fixture(scope="module")
def oracle(base_dir, prompt_dir):
    """(model name, text or token ids, max_tokens, chat) -> (text, finish_reason, tokens),
    from `generate` on a fresh base with the prompt file loaded alone."""
    base, tok = load_base(base_dir)

    def answer(name, text, max_tokens, chat=False):
        model = base
        if name != "base":
            model = load(prompt_dir / f"{name}.safetensors", base, tok)
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        ids = tok.encode(text) if isinstance(text, str) else text
        out = generate(model, [ids], max_tokens, eos_id=tok.eos_id, pad_id=tok.eos_id)[0]
        return tok.decode(out, skip_special=True), "length" if len(out) == max_tokens else "stop", len(out)
    return answer


class Both(PromptMethod):
    """A soft prompt's vectors and a prefix method's keys and values as one method: what the
    server's composition "soft+prefix" must compute, written without the bank."""

    def __init__(self, soft, prefix):
        super().__init__(soft.config)
        self.soft, self.prefix = soft, prefix
        self.n_input_tokens, self.position_offset = soft.n_input_tokens, prefix.position_offset

    def input_prompt(self):
        return self.soft.input_prompt()

    def prefixes(self, batch_size):
        return self.prefix.prefixes(batch_size)


def raw(server, method, path, body=None, headers=None):
    """(status, parsed JSON body) of a request sent as raw bytes (bad JSON and all)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stats(server):
    return raw(server, "GET", "/stats")[1]


# ---- the decoding loop ---------------------------------------------------------------------

def test_decode_steps_matches_generate_and_honours_per_row_limits(base_dir):
    """The server's step-wise decode: greedy rows are generate's tokens, each row stops at
    its own max_new_tokens, and a seeded sampled row does not depend on its batch-mates."""
    model, tok = load_base(base_dir)
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    expected = generate(model, prompts, 12, pad_id=2)
    steps = list(decode_steps(model, prompts, [12, 5, 9], pad_id=2))
    assert len(steps) == 12
    for i, n in enumerate([12, 5, 9]):
        row = [s[i] for s in steps]
        assert row[:n] == expected[i][:n] and row[n:] == [None] * (12 - n)
    sampled = lambda batch: [s[0] for s in decode_steps(model, batch, 10,
                                                        temperature=[1.0] + [0.0] * (len(batch) - 1),
                                                        seed=[7] + [None] * (len(batch) - 1), pad_id=2)]
    alone = sampled(prompts[:1])
    assert alone == sampled(prompts) and alone != expected[0][:10]
    stop = expected[0].index(expected[0][3]) + 1
    eos = list(decode_steps(model, prompts[:1], 12, eos_id=expected[0][3], pad_id=2))
    assert [s[0] for s in eos] == expected[0][:stop]  # the EOS id is yielded, then the row stops
    with pytest.raises(ValueError, match="context"):
        next(decode_steps(model, prompts, [10, 1024, 10], pad_id=2))


# ---- models and completions --------------------------------------------------------------

def test_models_lists_base_and_every_prompt_file(client, server):
    assert sorted(m.id for m in client.models.list()) == ["base", "prefix", "ptune", "soft"]
    assert client.models.retrieve("soft+prefix").id == "soft+prefix"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("name", ["base", "soft", "ptune", "prefix", "soft+prefix"])
def test_completion_equals_generate_with_the_prompt_alone(client, oracle, name, prompt_dir, base_dir):
    for text in TEXTS[:2]:
        r = client.completions.create(model=name, prompt=text, max_tokens=12, temperature=0)
        if name == "soft+prefix":  # composition: one method holding soft's virtual tokens and prefix's keys
            base, tok = load_base(base_dir)
            soft, prefix = (load(prompt_dir / f"{n}.safetensors", base, tok).method
                            for n in ("soft", "prefix"))
            out = generate(PromptedModel(base, Both(soft, prefix)), [tok.encode(text)], 12, eos_id=2,
                           pad_id=2)[0]
            expected = (tok.decode(out, skip_special=True), "length" if len(out) == 12 else "stop", len(out))
        else:
            expected = oracle(name, text, 12)
        assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == expected
        assert r.model == name and r.object == "text_completion"
        assert r.usage.prompt_tokens == len(text)  # one byte, one token in this vocabulary
        assert r.usage.total_tokens == len(text) + expected[2]
    outputs = {client.completions.create(model=m, prompt=TEXTS[0], max_tokens=12,
                                         temperature=0).choices[0].text
               for m in ("base", name)}
    assert name == "base" or len(outputs) == 2  # the prompt changes the answer


def test_prompt_list_and_token_ids(client, oracle):
    r = client.completions.create(model="soft", prompt=[TEXTS[0], TEXTS[3], [5, 6, 7]], max_tokens=8,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [oracle("soft", p, 8)[0] for p in (TEXTS[0], TEXTS[3], [5, 6, 7])]
    assert r.usage.prompt_tokens == len(TEXTS[0]) + len(TEXTS[3]) + 3


def test_chat_completion(client, oracle):
    r = client.chat.completions.create(model="ptune", messages=[{"role": "user", "content": "Hi!"}],
                                       max_tokens=10, temperature=0)
    text, reason, _ = oracle("ptune", "Hi!", 10, chat=True)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tiny_tokenizer().encode(tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hi!"}])))


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model="soft", prompt=TEXTS[1], max_tokens=20,
                                     temperature=0).choices[0].text
    stop = full[5:7]
    expected = full[:full.find(stop)]
    r = client.completions.create(model="soft", prompt=TEXTS[1], max_tokens=20, temperature=0,
                                  stop=[stop, "@@@"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model="soft", prompt=TEXTS[1], max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


# ---- streaming -------------------------------------------------------------------------------

def test_streamed_chunks_concatenate_to_the_reply(client, server):
    whole = client.completions.create(model="prefix", prompt=TEXTS[4], max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model="prefix", prompt=TEXTS[4], max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="soft", messages=msgs, max_tokens=15, temperature=0)
    deltas = list(client.chat.completions.create(model="soft", messages=msgs, max_tokens=15, temperature=0,
                                                 stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    # the wire format itself: data: lines, ending with [DONE]
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "base", "prompt": "ab", "max_tokens": 3,
                                                  "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


# ---- batching ------------------------------------------------------------------------------

def test_concurrent_requests_are_decoded_in_one_batch(static_server, oracle):
    """Static batching: five requests for different prompts (one a composition, one sampled)
    sent together: one batch of five rows, and each gets what it gets alone."""
    server = static_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    jobs = [("base", TEXTS[0], 6, 0.0), ("soft", TEXTS[1], 9, 0.0), ("ptune", TEXTS[2], 4, 0.0),
            ("prefix", TEXTS[3], 11, 0.0), ("soft+ptune", TEXTS[4], 7, 0.9)]
    ask = lambda m, t, n, temp: client.completions.create(model=m, prompt=t, max_tokens=n, temperature=temp,
                                                          seed=5)
    alone_sampled = ask(*jobs[4]).choices[0].text  # a seeded row samples the same, batched or not
    before = stats(server)["batch_sizes"]
    results, barrier = {}, threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        results[job[0]] = ask(*job)
    server.app.scheduler.window = 1.0  # generous: five threads on a busy machine
    try:
        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.app.scheduler.window = 0.005
    after = stats(server)["batch_sizes"]
    assert after.get("5", 0) == before.get("5", 0) + 1, (before, after)
    for name, text, n, temp in jobs[:4]:
        assert results[name].choices[0].text == oracle(name, text, n)[0], name
        assert results[name].usage.completion_tokens <= n
    assert results["soft+ptune"].choices[0].text == alone_sampled


# ---- hot-plugging --------------------------------------------------------------------------

def test_prompt_files_come_and_go_without_restart(client, prompt_dir, base_dir, oracle, server):
    late = prompt_dir / "late.safetensors"
    (prompt_dir / "broken.safetensors").write_bytes(b"not a prompt file")
    try:
        make_prompt(base_dir, late, "soft", seed=42)
        assert "late" in {m.id for m in client.models.list()}
        assert "broken" not in {m.id for m in client.models.list()}
        r = client.completions.create(model="late", prompt=TEXTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == oracle("late", TEXTS[0], 8)[0]
        # replaced in place (a new version of the file): the new one is served
        time.sleep(0.01)
        shutil.copy(prompt_dir / "prefix.safetensors", late)
        r = client.completions.create(model="late", prompt=TEXTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == oracle("prefix", TEXTS[0], 8)[0]
    finally:
        late.unlink(missing_ok=True)
        (prompt_dir / "broken.safetensors").unlink()
    assert "late" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="late", prompt=TEXTS[0], max_tokens=8)
    assert e.value.body["code"] == "model_not_found"


# ---- errors --------------------------------------------------------------------------------

BAD = [
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("POST", "/v1/completions", {"model": "soft+nope", "prompt": "x"}, 404, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "x"}, 400, None),
    ("POST", "/v1/completions", {"model": "soft"}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": ""}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": [1.5]}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": [999]}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "max_tokens": "5"}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "max_tokens": -1}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "max_tokens": True}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "temperature": 3}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "top_p": 0}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "n": 2}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x", "stop": [1]}, 400, None),
    ("POST", "/v1/completions", {"model": "soft", "prompt": "x" * 1000, "max_tokens": 100}, 400,
     "context_length_exceeded"),
    ("POST", "/v1/chat/completions", {"model": "soft"}, 400, None),
    ("POST", "/v1/chat/completions", {"model": "soft", "messages": []}, 400, None),
    ("POST", "/v1/chat/completions", {"model": "soft", "messages": "hi"}, 400, None),
    ("POST", "/v1/chat/completions", {"model": "soft", "messages": [{"role": "robot", "content": "x"}]},
     400, None),
    ("POST", "/v1/chat/completions", {"model": "soft", "messages": [{"role": "user", "content": 5}]},
     400, None),
    ("POST", "/v1/nothing", {"model": "soft"}, 404, None),
    ("GET", "/v1/nothing", None, 404, None),
]


@pytest.mark.parametrize("method, path, body, status, code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_style_errors(server, client, method, path, body, status, code):
    got, reply = raw(server, method, path, body)
    assert got == status, reply
    assert set(reply) == {"error"} and reply["error"]["message"] and reply["error"]["type"]
    if code:
        assert reply["error"]["code"] == code
    # and the server still answers
    assert client.completions.create(model="soft", prompt="ok", max_tokens=2).choices[0].text is not None


def test_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="soft", prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="soft", messages=[{"role": "user", "content": "x" * 1020}],
                                       max_tokens=50)
    assert e.value.code == "context_length_exceeded"


def test_a_client_leaving_mid_stream_does_not_stall_the_others(server, client, oracle):
    """A long stream (ignore_eos: 1000 tokens) whose client hangs up after the first chunk:
    the decode drops that row, the batch ends, and the next request gets its answer."""
    before = stats(server)["cancelled_rows"]
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"model": "soft", "prompt": "x", "max_tokens": 1000, "stream": True,
                             "ignore_eos": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.fp.readline().startswith(b"data: ")
    resp.close()  # the socket goes with it
    conn.close()
    t0 = time.monotonic()
    r = client.completions.create(model="prefix", prompt=TEXTS[0], max_tokens=5, temperature=0)
    assert r.choices[0].text == oracle("prefix", TEXTS[0], 5)[0]
    for _ in range(100):
        if stats(server)["cancelled_rows"] > before:
            break
        time.sleep(0.05)
    assert stats(server)["cancelled_rows"] == before + 1
    assert time.monotonic() - t0 < 30


# ---- packed decoding -------------------------------------------------------------------------

def test_packed_server_answers_as_generate_on_the_packed_model(tmp_path):
    """A base whose weights are 4-bit grids, as converted from a Q4_1 GGUF, served with
    packed=True: every projection runs on its codes (the 120-row head cannot), and the
    answers are `generate`'s on the same base packed."""
    from minipt.layers import Linear
    from minipt.packed import pack_for_decoding
    from test_packed import q4_1_gpt
    grid = q4_1_gpt(vocab_size=120, max_seq_len=256)
    (tmp_path / "base").mkdir()
    save_config(grid.config, tmp_path / "base")
    save_file({k: v.contiguous() for k, v in grid.state_dict().items()},
              tmp_path / "base" / "model.safetensors")
    tiny_tokenizer().save(tmp_path / "base")
    (tmp_path / "prompts").mkdir()
    with running(make_server(tmp_path / "base", tmp_path / "prompts", port=0, packed=True)) as server:
        base = server.app.base
        assert all(m.packed is not None for m in base.modules()
                   if isinstance(m, Linear) and m is not base.lm_head)
        assert base.lm_head.packed is None                       # 120 rows: the kernel takes multiples of 16
        status, body = raw(server, "POST", "/v1/completions",
                           {"model": "base", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0})
    model, tok = load_base(tmp_path / "base")
    pack_for_decoding(model)
    expected = generate(model, [tok.encode(TEXTS[1])], 12, eos_id=tok.eos_id, pad_id=tok.eos_id)[0]
    assert status == 200 and body["choices"][0]["text"] == tok.decode(expected, skip_special=True)


# ---- LoRA beside prompts ---------------------------------------------------------------------

def test_loras_are_served_per_row_beside_prompts(base_dir, tmp_path):
    """LoRA files in the folder are models too, decoded in one batch with prompts and the bare
    base (never merged): each answer equals generate on a base with that LoRA alone; "lora+soft"
    is the soft prompt on the LoRA'd base; two LoRAs in one row and full fine-tuning are refused."""
    make_prompt(base_dir, tmp_path / "soft.safetensors", "soft", seed=0)
    for name, seed, targets in [("lora", 1, ["q_proj", "v_proj"]), ("lora_b", 2, ["k_proj", "up_proj"])]:
        base, tok = load_base(base_dir)
        model = attach(base, PromptConfig(method="lora", lora_r=2, lora_targets=targets, seed=seed))
        with torch.no_grad():
            for p in model.method.lora_B.values():
                p.normal_(0, 0.5)
        save(model, tmp_path / f"{name}.safetensors", tok)
    base, tok = load_base(base_dir)
    save(attach(base, PromptConfig(method="full")), tmp_path / "full.safetensors", tok)

    def alone(names, text):
        base, tok = load_base(base_dir)
        model = base
        for name in names.split("+"):   # the LoRA first: the soft prompt then runs on its layers
            model = load(tmp_path / f"{name}.safetensors", base, tok) if name != "base" else model
        out = generate(model, [tok.encode(text)], 10, eos_id=tok.eos_id, pad_id=tok.eos_id)[0]
        return tok.decode(out, skip_special=True)

    jobs = [("lora", TEXTS[0]), ("lora_b", TEXTS[1]), ("soft", TEXTS[2]), ("base", TEXTS[3]),
            ("lora+soft", TEXTS[4]), ("lora", TEXTS[1])]
    with running(make_server(base_dir, tmp_path, port=0, window=1.0, scheduler="static")) as static, \
            running(make_server(base_dir, tmp_path, port=0)) as continuous:
        assert sorted(m["id"] for m in raw(continuous, "GET", "/v1/models")[1]["data"]) == \
            ["base", "lora", "lora_b", "soft"]                       # full fine-tuning is not servable
        for server in (static, continuous):
            replies, barrier = {}, threading.Barrier(len(jobs))

            def ask(i, model, text):
                barrier.wait()
                replies[i] = raw(server, "POST", "/v1/completions", {"model": model, "prompt": text,
                                                                     "max_tokens": 10, "temperature": 0})
            threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for i, (model, text) in enumerate(jobs):
                assert replies[i][1]["choices"][0]["text"] == alone(model, text), (server.url, model)
        assert "6" in stats(static)["batch_sizes"]                  # one batch held them all
        status, reply = raw(continuous, "POST", "/v1/completions", {"model": "lora+lora_b", "prompt": "x"})
        assert status == 400 and reply["error"]["param"] == "model" and "one LoRA" in reply["error"]["message"]
        assert all(torch.equal(a, b) for a, b in zip(continuous.app.base.state_dict().values(),
                                                      load_base(base_dir)[0].state_dict().values()))
