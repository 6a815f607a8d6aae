"""bench/experiments.py end to end at its --quick size, on a tiny random Llama with SmolLM2's
vocabulary: every experiment runs through train.py and its outputs hold what they claim."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_hf, tiny_hf_model
from minipt.tensorfile import read_tensors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import experiments  # noqa: E402
from experiments import INITS  # noqa: E402

METHODS = ["prompt_tuning", "full"]  # a prompt and the one method whose file is the whole model


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from minipt.convert import convert
    root = tmp_path_factory.mktemp("experiments")
    hf = tiny_hf_model("llama", vocab_size=49152)  # real text goes through it
    # room for the topic task's 128 tokens and a prompt (RoPE: no table to resize)
    hf.config.max_position_embeddings = 256
    save_tiny_hf(hf, root / "hf")
    convert(root / "hf", root / "base")
    argv = ["--quick", "--methods", ",".join(METHODS), "--base", str(root / "base"),
            "--work", str(root / "work"), "--results", str(root / "results")]
    experiments.main(argv)
    return root, argv


def test_methods_rows_per_method_and_seed(quick_run):
    root, _ = quick_run
    report = json.loads((root / "results" / "results.json").read_text())
    size = experiments.QUICK
    runs = report["runs"]
    assert sorted((r["task"], r["method"], r["seed"]) for r in runs) == sorted(
        (t, m, s) for t in experiments.TASKS for m in METHODS for s in range(size.seeds))
    n_params = report["base_parameters"]
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["zero_shot"] <= 1.0
        assert r["train_seconds"] >= 0 and 0.1 < r["peak_rss_gb"] < 64
        # 20 tokens x d_model 64; every weight
        expected = 20 * 64 if r["method"] == "prompt_tuning" else n_params
        assert r["trainable_parameters"] == expected
        assert r["prompt_file_bytes"] > 4 * expected  # fp32 tensors plus the header
    summary = report["methods"]
    assert [(r["task"], r["method"]) for r in summary] == [
        (t, m) for t in experiments.TASKS for m in ["zero_shot"] + METHODS]
    full = [r for r in summary if r["method"] == "full"]
    assert all(r["share"] == 1.0 for r in full)
    for r in summary:
        assert r["seeds"] == (1 if r["method"] == "zero_shot" else size.seeds)
        seeds = [x["accuracy"] for x in runs if x["task"] == r["task"] and x["method"] == r["method"]]
        if seeds:
            assert r["accuracy"] == pytest.approx(sum(seeds) / len(seeds))
        assert 1 / len(experiments.BUILTIN[r["task"]][2]) <= r["majority"] <= 1.0   # at least an even share


def test_init_length_ensemble_interpretation(quick_run):
    root, _ = quick_run
    report = json.loads((root / "results" / "results.json").read_text())
    size = experiments.QUICK
    assert [r["init"] for r in report["init"]] == list(INITS)
    assert all(len(r["seeds"]) == size.seeds for r in report["init"])
    assert [(r["num_virtual_tokens"], r["trainable_parameters"]) for r in report["length"]] == [
        (n, n * 64) for n in size.lengths]
    # equal settings are one run: the 20-token length point is the methods' soft prompt of seed 0
    soft_prompt_s0 = next(r for r in report["runs"] if r["run"] == "sentiment-prompt_tuning-s0")
    assert report["length"][-1]["accuracy"] == soft_prompt_s0["accuracy"]
    assert report["init"][INITS.index("text")]["seeds"][0] == soft_prompt_s0["accuracy"]
    e = report["ensemble"]
    assert len(e["members"]) == size.ensemble
    assert e["member_best"] == max(e["members"]) and min(e["members"]) <= e["member_mean"] <= e["member_best"]
    # scored in one batched forward, each member matches what train.py measured for its run
    n_test = size.test_rows["sentiment"]
    assert all(abs(a - b) <= 1 / n_test for a, b in zip(e["members"], e["runs_reported"]))
    text, labels = report["interpretation"]["text"], report["interpretation"]["labels"]
    assert len(text["tokens"]) == len(labels["tokens"]) == 20
    # text init starts at the tokens of init_text; labels init at the class labels, then vocabulary
    from minipt.tokenizer import load_tokenizer
    tok = load_tokenizer(root / "base")
    words = [tok.decode([i]) for i in tok.encode(experiments.TASKS["sentiment"]["init_text"])]
    assert [t["start"] for t in text["tokens"][:len(words)]] == words
    assert [t["start"] for t in labels["tokens"][:2]] == [" negative", " positive"]
    assert all(len(t["nearest"]) == 5 and t["similarity"] == sorted(t["similarity"], reverse=True)
               for t in text["tokens"])


def test_tables_plots_and_provenance(quick_run):
    root, argv = quick_run
    md = (root / "results" / "results.md").read_text()
    report = json.loads((root / "results" / "results.json").read_text())
    assert report["command"] == "python bench/experiments.py " + " ".join(argv)
    assert f"`{report['commit']}`" in md and report["command"] in md
    for heading in ("## Methods", "### sentiment", "### topic", "## Soft-prompt initialisation",
                    "## Soft-prompt length", "## Ensemble of 3", "## Nearest vocabulary tokens"):
        assert heading in md
    for label in ("zero-shot", "soft prompt", "full fine-tuning"):
        assert md.count(f"| {label} |") == 2  # one row per task
    for name in ("methods.png", "init.png", "length.png", "ensemble.png"):
        assert (root / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((root / "work" / "runs").glob("*-full-*/prompt.safetensors"))  # whole models are not kept


def test_rerun_resumes_from_finished_runs(quick_run, capsys):
    root, argv = quick_run
    before = {p: p.stat().st_mtime_ns for p in (root / "work" / "runs").glob("*/result.json")}
    experiments.main(argv + ["--only", "methods,length", "--results", str(root / "results-again")])
    out = capsys.readouterr().out
    n = int(out.split(" training runs")[0].split()[-1])
    assert f"{n} training runs" in out and f"{n} already done" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing trained again


def test_scale_report_from_the_runs_done(quick_run, monkeypatch, tmp_path):
    """bench/scale.py reads each base's runs as experiments.py left them: per task and method
    the mean over the seeds done, zero-shot from the runs, the base's size from its header."""
    import scale
    root, _ = quick_run
    monkeypatch.setattr(scale, "work_dir", lambda base: root / "work")
    monkeypatch.setattr(scale, "checkpoint_dir", lambda base: root / "base")
    report = json.loads((root / "results" / "results.json").read_text())
    rows = scale.collect(scale.run_records(["smollm2"], METHODS, []), ["smollm2"], METHODS)
    by_key = {(r["task"], r["method"]): r for r in rows}
    assert set(by_key) == {(t, m) for t in experiments.TASKS for m in ["zero_shot"] + METHODS}
    for r in report["methods"]:
        assert by_key[r["task"], r["method"]]["accuracy"] == pytest.approx(r["accuracy"])
    assert {r["parameters"] for r in rows} == {report["base_parameters"]}
    text = scale.markdown(dict(command="c", commit="x", dirty=False, machine="m", rows=rows))
    for r in report["methods"]:
        assert experiments.pct(r["accuracy"]) in text
    assert scale.plot(rows, tmp_path / "scale.png") and (tmp_path / "scale.png").stat().st_size > 0


def test_scale_report_survives_a_clean_clone(quick_run, monkeypatch, tmp_path):
    """The committed runs.json alone remakes the report (no work folder, no base weights), and
    restored into an empty work folder it gives back each result.json, so nothing trains again."""
    import scale
    root, _ = quick_run
    monkeypatch.setattr(scale, "checkpoint_dir", lambda base: root / "base")
    monkeypatch.setattr(scale, "work_dir", lambda base: root / "work")
    kept = json.loads(json.dumps(scale.run_records(["smollm2"], METHODS, [])))   # as read from disk
    rows = scale.collect(kept, ["smollm2"], METHODS)
    clean = tmp_path / "clean"
    monkeypatch.setattr(scale, "checkpoint_dir", lambda base: clean / "no-weights")
    monkeypatch.setattr(scale, "work_dir", lambda base: clean / "work")
    assert scale.collect(scale.run_records(["smollm2"], METHODS, kept), ["smollm2"], METHODS) == rows
    scale.restore("smollm2", kept)
    restored = sorted((clean / "work" / "runs").glob("*/result.json"))
    assert len(restored) == len(kept) > 0
    for path in restored:
        assert json.loads(path.read_text()) == json.loads((root / "work" / path.relative_to(clean / "work")).read_text())


def test_interrupted_run_continues_from_its_checkpoint(quick_run, monkeypatch, tmp_path):
    """A run stopped after a checkpoint and before its result continues from that checkpoint
    (full fine-tuning of a big base takes hours) and ends as a run never stopped."""
    root, _ = quick_run
    monkeypatch.setattr(experiments, "CKPT_INTERVAL", 1)
    run = experiments.make_run("sentiment", "prompt_tuning", 0, experiments.QUICK)
    data = root / "work" / "data" / "sentiment"
    straight = experiments.train(run, str(root / "base"), data, tmp_path / "straight", threads=1)
    assert "resumed_at_step" not in straight

    # stopped at the end, before experiments.py wrote result.json: its last checkpoint is step 2
    out = tmp_path / "stopped" / "runs" / run.name
    out.mkdir(parents=True)
    (out / "settings.py").write_text(experiments.settings_file(
        {**run.settings, "base": str(root / "base"), "data": str(data), "out_dir": str(out)}))
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(out / "settings.py")], cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    assert (out / "checkpoint.pt").exists() and not (out / "result.json").exists()

    resumed = experiments.train(run, str(root / "base"), data, tmp_path / "stopped", threads=1)
    assert resumed["resumed_at_step"] == run.settings["steps"] - 1
    assert resumed["accuracy"] == straight["accuracy"]
    a, b = (read_tensors(tmp_path / d / "runs" / run.name / "prompt.safetensors") for d in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoint.pt").exists()  # not kept once the run is complete
