"""A LangGraph agent whose every step is served by one minipt server, each by its own prompt
file: it classifies a customer review with one prompt (through langchain-openai's completion
model), routes on the label, replies with another prompt (its chat model), and has the bare
base write a one-line summary. The server batches these steps with whatever else it serves.

    .venv/bin/python -m minipt.serve --base weights/smollm2-135m-instruct --prompts out/prompts &
    .venv/bin/python examples/agent.py --url http://127.0.0.1:8000/v1 --review "a gripping, funny film"

Without --url the script starts the server itself, in this process, from --base and --prompts.
--classifier and --replier name prompt files of the folder ("sentiment" and "style": any
others will do; "base" is the bare model).
"""
import argparse
import sys
import threading
from pathlib import Path
from typing import TypedDict

from langchain_openai import ChatOpenAI, OpenAI
from langgraph.graph import END, START, StateGraph

REPLIES = {  # the route taken on the label -> what the reply step is asked to do
    "thank": "Thank the customer for this review in one sentence.",
    "apologise": "Apologise to the customer for this review in one sentence.",
    "ask": "Ask the customer, in one sentence, what they thought of the film.",
}


class State(TypedDict, total=False):
    review: str
    label: str
    route: str
    reply: str
    summary: str


def classify_prompt(review: str) -> str:
    return f"Review: {review}\nSentiment:"


def summary_prompt(state: State) -> str:
    return f"Review: {state['review']}\nOur reply: {state['reply']}\nOne-line summary:"


def route(label: str) -> str:
    label = label.strip().lower()
    return "thank" if label.startswith("pos") else "apologise" if label.startswith("neg") else "ask"


def build(url: str, classifier: str, replier: str, max_tokens: int = 48):
    """The compiled graph: classify -> (thank | apologise | ask) -> summarize."""
    common = dict(base_url=url, api_key="unused", temperature=0, max_retries=2)
    classify_llm = OpenAI(model=classifier, max_tokens=2, **common)            # /v1/completions
    reply_llm = ChatOpenAI(model=replier, max_tokens=max_tokens, **common)      # /v1/chat/completions
    summary_llm = OpenAI(model="base", max_tokens=max_tokens, **common)

    def classify(state: State) -> State:
        label = classify_llm.invoke(classify_prompt(state["review"]))
        return {"label": label, "route": route(label)}

    def reply_node(task: str):
        def reply(state: State) -> State:
            answer = reply_llm.invoke([("system", task), ("user", state["review"])])
            return {"reply": answer.content}
        return reply

    def summarize(state: State) -> State:
        return {"summary": summary_llm.invoke(summary_prompt(state)).strip()}

    graph = StateGraph(State)
    graph.add_node("classify", classify)
    for name, task in REPLIES.items():
        graph.add_node(name, reply_node(task))
        graph.add_edge(name, "summarize")
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "classify")
    graph.add_conditional_edges("classify", lambda state: state["route"], list(REPLIES))
    graph.add_edge("summarize", END)
    return graph.compile()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--review", default="a gripping, funny film with a great cast")
    ap.add_argument("--url", help="a running server's /v1 address; without it one starts here")
    ap.add_argument("--base", default="weights/smollm2-135m-instruct")
    ap.add_argument("--prompts", default="out/prompts")
    ap.add_argument("--classifier", default="sentiment")
    ap.add_argument("--replier", default="style")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    server = None
    if args.url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import torch
        from minipt.serve import make_server
        server = make_server(args.base, args.prompts, port=0, dtype=torch.bfloat16)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        args.url = server.url + "/v1"
    try:
        graph = build(args.url, args.classifier, args.replier, args.max_tokens)
        state = graph.invoke({"review": args.review})
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    for key in ("label", "route", "reply", "summary"):
        print(f"{key:>8}: {state[key]!r}")
    return state


if __name__ == "__main__":
    main()
