"""lm-evaluation-harness scoring through the server: `lm_eval --model local-completions` with
the server's own tokenizer endpoints (tokenizer_backend=remote) runs a multiple-choice task
of our own (a YAML task over a JSONL file) on the bare base, a soft prompt, a prefix and a
LoRA, and its per-row log-likelihoods and choices equal the project's rank classification
(`generate.py --labels`, minipt.evaluation) of the same rows with the prompt file loaded
alone. On SmolLM2, the served log-likelihoods equal transformers' within 1e-3."""
import json

import pytest
import torch
from test_serve import base_dir, make_prompt, running  # noqa: F401 (fixtures)

from minipt.checkpoint import load_base
from minipt.evaluation import label_scores
from minipt.prompts import PromptConfig, attach, load, save
from minipt.serve import make_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
LABELS = [" good", " bad", " fine"]
TASK = """task: minipt_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: {labels}
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def served(base_dir, tmp_path_factory):
    """A prompt folder with a soft prompt, a prefix and a LoRA (B randomised, so it matters)."""
    folder = tmp_path_factory.mktemp("harness-prompts")
    make_prompt(base_dir, folder / "soft.safetensors", "soft", seed=1)
    make_prompt(base_dir, folder / "prefix.safetensors", "prefix", seed=2)
    base, tok = load_base(base_dir)
    lora = attach(base, PromptConfig(method="lora", lora_r=2, lora_targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for p in lora.method.lora_B.values():
            p.normal_(0, 0.5)
    save(lora, folder / "lora.safetensors", tok)
    with running(make_server(base_dir, folder, port=0)) as server:
        yield server, folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness-task")
    g = torch.Generator().manual_seed(0)
    words = ["the film", "a plot", "music", "it was", "acting", "this one", "ending"]
    picks = torch.randint(0, len(words), (12, 3), generator=g).tolist()
    rows = [{"input": " ".join(words[i] for i in pick) + ":", "label": n % len(LABELS)}
            for n, pick in enumerate(picks)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(TASK.format(data=folder / "rows.jsonl", labels=json.dumps(LABELS)))
    return folder, rows


@pytest.mark.parametrize("name", ["base", "soft", "prefix", "lora"])
def test_lm_eval_through_the_server_equals_rank_classification(served, task_dir, base_dir, name, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    server, folder = served
    directory, rows = task_dir
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["minipt_tiny_choice"], log_samples=True,
        model_args=f"model={name},base_url={server.url}/v1/completions,tokenizer_backend=remote,max_retries=1",
        task_manager=TaskManager(include_path=str(directory)))
    samples = sorted(out["samples"]["minipt_tiny_choice"], key=lambda s: s["doc_id"])
    served_scores = torch.tensor([[ll for ll, _ in s["filtered_resps"]] for s in samples])     # (N, L)

    base, tok = load_base(base_dir)
    model = base if name == "base" else load(folder / f"{name}.safetensors", base, tok)
    examples = [{"input": r["input"], "target": LABELS[r["label"]]} for r in rows]
    ours = label_scores(model, tok, examples, "{input}", LABELS)[:, 0]                          # (N, L)
    assert (served_scores - ours).abs().max() < 1e-4
    assert served_scores.argmax(-1).tolist() == ours.argmax(-1).tolist()
    accuracy = (ours.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean().item()
    assert out["results"]["minipt_tiny_choice"]["acc,none"] == pytest.approx(accuracy)


def test_smollm2_loglikelihoods_equal_transformers(smollm2_dir, hf_smollm2, tmp_path):
    from minipt.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    texts = ["The capital of France is Paris, and the capital of Italy is Rome.",
             "Review: a gripping, funny film\nSentiment: positive"]
    (tmp_path / "prompts").mkdir()
    with running(make_server(smollm2_dir, tmp_path / "prompts", port=0, dtype=torch.float32)) as server:
        import urllib.request
        for text in texts:
            ids = tok.encode(text)
            req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "base", "prompt": ids, "max_tokens": 0,
                                                          "echo": True, "logprobs": 1}).encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                got = json.loads(r.read())["choices"][0]["logprobs"]["token_logprobs"]
            with torch.no_grad():
                lp = hf_smollm2(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            expected = lp[torch.arange(len(ids) - 1), ids[1:]]
            assert got[0] is None and (torch.tensor(got[1:]) - expected).abs().max() < 1e-3


def test_the_readme_lm_eval_command(served, task_dir, base_dir, tmp_path):
    """The README's command, as a user runs it (on our task, our server, the soft prompt)."""
    import shlex
    import subprocess
    import sys
    from test_readme import shell_commands
    server, folder = served
    directory, rows = task_dir
    (command,) = [c for c in shell_commands() if c.startswith(".venv/bin/lm_eval ")]
    command = (command.replace("DIR_OF_YOUR_YAML_TASKS", str(directory)).replace("TASK", "minipt_tiny_choice")
               .replace("http://127.0.0.1:8000", server.url).replace("model=sentiment", "model=soft"))
    args = [sys.executable, "-m", "lm_eval", *shlex.split(command)[1:], "--output_path", str(tmp_path)]
    subprocess.run(args, check=True, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"},
                   capture_output=True, timeout=600)
    (result,) = tmp_path.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["minipt_tiny_choice"]["acc,none"]
    base, tok = load_base(base_dir)
    model = load(folder / "soft.safetensors", base, tok)
    examples = [{"input": r["input"], "target": LABELS[r["label"]]} for r in rows]
    predicted = label_scores(model, tok, examples, "{input}", LABELS)[:, 0].argmax(-1)
    assert acc == pytest.approx((predicted == torch.tensor([r["label"] for r in rows])).float().mean().item())
