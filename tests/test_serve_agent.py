"""The LangGraph example (examples/agent.py) against the server on the tiny base of
test_serve.py, through the real langchain-openai and langgraph: each step reaches the server
under its own model name and gets what `generate` gives that prompt file alone."""
import importlib.util
from pathlib import Path

import pytest
from test_serve import base_dir, oracle, prompt_dir, running  # noqa: F401 (fixtures)

from minipt.serve import make_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "agent.py"


def load_example():
    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_langgraph_agent_routes_each_step_to_its_prompt(base_dir, prompt_dir, oracle):
    agent = load_example()
    seen = []
    with running(make_server(base_dir, prompt_dir, port=0)) as server:
        parse = server.app.resolve_model
        server.app.resolve_model = lambda model: seen.append(model) or parse(model)
        review = "dull and far too long"
        state = agent.build(server.url + "/v1", classifier="soft", replier="prefix", max_tokens=12).invoke(
            {"review": review})
    assert seen == ["soft", "prefix", "base"]
    assert state["label"] == oracle("soft", agent.classify_prompt(review), 2)[0]
    assert state["route"] == agent.route(state["label"]) and state["route"] in agent.REPLIES
    # the chat step: the system turn of its route and the review, through the chat template
    from minipt.checkpoint import load_base
    from minipt.generation import generate
    from minipt.prompts import load
    base, tok = load_base(base_dir)
    chat = tok.apply_chat_template([{"role": "system", "content": agent.REPLIES[state["route"]]},
                                    {"role": "user", "content": review}])
    ids = tok.encode(chat)
    out = generate(load(prompt_dir / "prefix.safetensors", base, tok), [ids], 12, eos_id=2, pad_id=2)[0]
    assert state["reply"] == tok.decode(out, skip_special=True)
    assert state["summary"] == oracle("base", agent.summary_prompt(state), 12)[0].strip()


def test_the_example_runs_as_a_script(base_dir, prompt_dir, capsys):
    """As the README runs it: no --url, so it starts its own server."""
    state = load_example().main(["--base", str(base_dir), "--prompts", str(prompt_dir),
                                 "--classifier", "ptune", "--replier", "soft", "--max-tokens", "5"])
    assert set(state) == {"review", "label", "route", "reply", "summary"}
    assert "summary:" in capsys.readouterr().out
