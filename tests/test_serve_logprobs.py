"""Logprobs, echo and the tokenizer endpoints of the server (minipt/serve.py): every served
log-probability equals the log-softmax of the logits the row's prompt file gives alone
(PromptedModel's full forward, no KV cache, no batch), for the echoed prompt and the
completion, greedy or not, streamed or not, batched with other prompts or not; virtual
tokens and a BOS the server adds never show; bad values are 400s naming the parameter.
The tiny base and prompt files of test_serve.py."""
import threading

import openai
import pytest
import torch
from test_serve import (TEXTS, base_dir, oracle, prompt_dir, raw, running,  # noqa: F401 (fixtures)
                        tiny_tokenizer)

from minipt.checkpoint import load_base
from minipt.prompts import load
from minipt.serve import make_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
MODELS = ["base", "soft", "ptune", "prefix"]


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(request, base_dir, prompt_dir):
    with running(make_server(base_dir, prompt_dir, port=0, scheduler=request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alone(base_dir, prompt_dir):
    """(model name, ids) -> (T, V) fp32 log-probabilities of the next token at every position,
    from one forward of the row alone under its prompt file."""
    def logprobs(name, ids):
        base, tok = load_base(base_dir)
        model = base if name == "base" else load(prompt_dir / f"{name}.safetensors", base, tok)
        with torch.no_grad():
            return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    return logprobs


def completion(server, **body):
    status, reply = raw(server, "POST", "/v1/completions", {"temperature": 0, **body})
    assert status == 200, reply
    return reply["choices"][0]


@pytest.mark.parametrize("name", MODELS)
def test_echo_scores_the_prompt_as_the_model_alone(server, alone, name):
    ids = [7 + 3 * i for i in range(12)]
    choice = completion(server, model=name, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = choice["logprobs"]
    assert choice["text"] == tiny_tokenizer().decode(ids) and choice["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = alone(name, ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - expected[t - 1, ids[t]].item()) < 1e-4, t
        top = lp["top_logprobs"][t]
        best = expected[t - 1].topk(3)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert 3 <= len(top) <= 4 and lp["tokens"][t] in top                  # the top 3 and the token itself
    text = choice["text"]
    assert [text[o:o + len(s)] for o, s in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]


@pytest.mark.parametrize("name", ["base", "soft", "prefix"])
def test_completion_logprobs_are_the_generated_tokens_own(server, alone, oracle, name):
    prompt = TEXTS[1]
    choice = completion(server, model=name, prompt=prompt, max_tokens=6, logprobs=2, echo=True)
    text, _, n = oracle(name, prompt, 6)
    assert choice["text"] == prompt + text
    lp = choice["logprobs"]
    ids = tiny_tokenizer().encode(prompt + text)
    assert len(lp["tokens"]) == len(prompt) + n
    expected = alone(name, ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - expected[t - 1, ids[t]].item()) < 1e-4, t
    # greedy: every generated token is its place's most likely one, as a harness checks
    for t in range(len(prompt), len(ids)):
        assert lp["token_logprobs"][t] == max(lp["top_logprobs"][t].values())


def test_a_bos_the_server_adds_is_neither_echoed_nor_scored(server, alone, monkeypatch):
    tok = server.app.tokenizer
    monkeypatch.setattr(tok, "add_bos", True, raising=False)   # as Gemma's: a string prompt starts with BOS
    choice = completion(server, model="soft", prompt="Hello", max_tokens=1, echo=True, logprobs=0)
    monkeypatch.undo()
    lp = choice["logprobs"]
    assert lp["tokens"][:5] == list("Hello") and lp["token_logprobs"][0] is None
    ids = [tok.bos_id, *tok.encode("Hello")]
    expected = alone("soft", ids)
    assert abs(lp["token_logprobs"][1] - expected[1, ids[2]].item()) < 1e-4   # "e" after BOS, "H"
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])                 # logprobs=0: the token alone


def test_logprobs_in_a_mixed_batch_equal_each_row_alone(server, alone):
    """Requests for every model sent together, so the scheduler batches them."""
    prompts = {name: [5 + i * (j + 2) % 100 for i in range(6 + 2 * j)] for j, name in enumerate(MODELS)}
    replies, barrier = {}, threading.Barrier(len(MODELS))

    def ask(name):
        barrier.wait()
        replies[name] = completion(server, model=name, prompt=prompts[name], max_tokens=8, logprobs=1,
                                   echo=True, ignore_eos=True)
    threads = [threading.Thread(target=ask, args=(n,)) for n in MODELS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    tok = tiny_tokenizer()
    for name, ids in prompts.items():
        lp = replies[name]["logprobs"]
        generated = tok.encode("".join(lp["tokens"][len(ids):]))   # special tokens too (ignore_eos)
        assert len(generated) == 8
        full = ids + generated
        expected = alone(name, full)
        got = torch.tensor(lp["token_logprobs"][1:])
        assert (got - expected[torch.arange(len(full) - 1), full[1:]]).abs().max() < 1e-4, name


def test_sampled_and_streamed_logprobs(server, client, alone):
    r = client.completions.create(model="ptune", prompt=TEXTS[0], max_tokens=10, temperature=0.9, seed=3,
                                  logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert "".join(c.logprobs.tokens) == c.text and len(c.logprobs.tokens) == 10
    full = tiny_tokenizer().encode(TEXTS[0] + c.text)
    expected = alone("ptune", full)[len(TEXTS[0]) - 1:-1]
    got = torch.tensor(c.logprobs.token_logprobs)
    assert (got - expected[torch.arange(10), full[len(TEXTS[0]):]]).abs().max() < 1e-4
    chunks = list(client.completions.create(model="ptune", prompt=TEXTS[0], max_tokens=10, temperature=0.9,
                                            seed=3, logprobs=2, extra_body={"ignore_eos": True}, stream=True))
    pieces = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    tokens = [t for lp in pieces for t in lp.tokens]
    values = [v for lp in pieces for v in lp.token_logprobs]
    offsets = [o for lp in pieces for o in lp.text_offset]
    assert tokens == c.logprobs.tokens and values == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)
    assert offsets == c.logprobs.text_offset


def test_chat_logprobs(server, client, alone):
    msgs = [{"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="soft", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token for e in content)
    tok = tiny_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(msgs))
    full = prompt + tok.encode(r.choices[0].message.content)
    expected = alone("soft", full)
    for j, e in enumerate(content):
        assert abs(e.logprob - expected[len(prompt) + j - 1, full[len(prompt) + j]].item()) < 1e-4
        assert e.logprob == e.top_logprobs[0].logprob                     # greedy
    streamed = list(client.chat.completions.create(model="soft", messages=msgs, max_tokens=8, temperature=0,
                                                   logprobs=True, stream=True))
    tokens = [e.token for ch in streamed if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]
    plain = client.chat.completions.create(model="soft", messages=msgs, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


BAD = [
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"logprobs": 1, "n": 2}, "n"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -2}, "top_logprobs"),
]


@pytest.mark.parametrize("path, extra, param", BAD, ids=[f"{p.split('/')[-1]}-{x}" for p, _, x in BAD])
def test_bad_logprob_requests_are_400s_naming_the_parameter(server, path, extra, param):
    body = ({"model": "soft", "messages": [{"role": "user", "content": "x"}]} if "chat" in path
            else {"model": "soft", "prompt": "x"})
    status, reply = raw(server, "POST", path, {**body, **extra})
    assert status == 400 and reply["error"]["param"] == param, reply
    assert completion(server, model="soft", prompt="ok", max_tokens=2)["text"] is not None


# ---- shared prompt states --------------------------------------------------------------------

def test_a_prompts_state_is_computed_once_and_reused(base_dir, prompt_dir, oracle):
    """The soft prompt's virtual tokens run once; later rows start after them (and get the
    same answers); the LRU keeps at most its capacity; the static scheduler keeps none."""
    with running(make_server(base_dir, prompt_dir, port=0, prompt_states=2)) as server:
        states = lambda: raw(server, "GET", "/stats")[1]["prompt_states"]
        for i in range(3):
            assert completion(server, model="soft", prompt=TEXTS[i], max_tokens=6)["text"] == \
                oracle("soft", TEXTS[i], 6)[0]
        assert states() == {"cached": 1, "hits": 2, "misses": 1, "prefill_tokens_saved": 2 * 4}
        for name in ("ptune", "soft+ptune", "prefix", "ptune"):
            completion(server, model=name, prompt=TEXTS[0], max_tokens=2)
        s = states()
        # prefix has no virtual tokens (its keys and values are the file's); LRU of 2 dropped soft
        assert (s["cached"], s["misses"], s["hits"]) == (2, 3, 3)
        r = completion(server, model="soft+ptune", prompt=TEXTS[3], max_tokens=6)
        assert states()["hits"] == 4 and r["text"]


# ---- the tokenizer endpoints ---------------------------------------------------------------

def test_tokenize_detokenize_and_tokenizer_info(server):
    tok = tiny_tokenizer()
    status, r = raw(server, "POST", "/tokenize", {"prompt": "Hi <|im_end|>", "return_token_strs": True})
    assert status == 200 and r["tokens"] == tok.encode("Hi <|im_end|>") and r["count"] == 4
    assert r["token_strs"] == ["H", "i", " ", "<|im_end|>"] and r["max_model_len"] == 1024
    msgs = [{"role": "user", "content": "Hi"}]
    r = raw(server, "POST", "/tokenize", {"messages": msgs, "model": "soft"})[1]
    assert r["tokens"] == tok.encode(tok.apply_chat_template(msgs))
    assert raw(server, "POST", "/detokenize", {"tokens": r["tokens"]})[1]["prompt"] == \
        tok.apply_chat_template(msgs)
    info = raw(server, "GET", "/tokenizer_info")[1]
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == ("<|im_end|>", "<|im_start|>",
                                                                             tok.chat_template)
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
                              ("/detokenize", {"tokens": [999]}, "tokens"),
                              ("/detokenize", {"tokens": "ab"}, "tokens")]:
        status, reply = raw(server, "POST", path, body)
        assert status in (400, 404) and reply["error"]["param"] == param, (path, body, reply)


def test_lm_eval_detects_and_uses_the_remote_tokenizer(server):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    assert check_remote_tokenizer_support(server.url + "/v1/completions")
    remote = RemoteTokenizer(server.url + "/v1/completions")
    tok = tiny_tokenizer()
    assert remote.encode("Hello there") == tok.encode("Hello there")
    assert remote.eos_token_id == tok.eos_id and remote.decode([5, 6, 7]) == tok.decode([5, 6, 7])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_the_reported_chat_template_renders_what_the_server_applies():
    """applied_chat_template, rendered by Jinja as a client would, equals apply_chat_template
    for ChatML (SmolLM2's own template, with its default system turn) and transcripts."""
    import jinja2
    from minipt.fetch import fetch
    from minipt.tokenizer import BPETokenizer
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n"}]]
    tokenizers = [tiny_tokenizer(), BPETokenizer.from_gguf(fetch("smollm2-gguf")),
                  BPETokenizer.from_gpt2_files(fetch("gpt2-encoder"), fetch("gpt2-vocab-bpe"))]
    assert [t.chat_format for t in tokenizers] == ["chatml", "chatml", "transcript"]
    env = jinja2.Environment()
    for tok in tokenizers:
        template = env.from_string(tok.applied_chat_template)
        for messages in chats:
            for gen in (True, False):
                assert template.render(messages=messages, add_generation_prompt=gen,
                                       bos_token="") == tok.apply_chat_template(messages, gen)
