"""Scoring a model (base or prompted) on a task: rank classification and ROUGE-L.

Rank classification (Brown et al. 2020, *Language Models are Few-Shot Learners*, §2; used
by Lester et al. 2021 for T5): every candidate label is scored by the log-probability of
its tokens after the prompt, log p(label | prompt) = sum_i log p(label_i | prompt,
label_<i), and the best one wins. The model never has to produce a well-formed answer,
only to prefer the right one, so zero-shot numbers are meaningful.

ROUGE-L (Lin 2004, *ROUGE: A Package for Automatic Evaluation of Summaries*): the longest
common subsequence of the two word sequences, as the F-measure of its precision and recall.

Everything here reads only what every model returns: the loss-free logits aligned with
the caller's input positions, or the last position's logits with `last_only=True`.
"""
import contextlib
import re

import torch

from .data import encode_example, encode_prompt, encode_text
from .generation import generate, pad_batch


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode (no dropout) without gradients; the caller's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _limit(model, max_len, reserve=0):
    """Tokens a prompt may use: the decoder's context minus the positions a prompt method
    takes and `reserve`; 512 (T5's training length) for the relative-position T5 unless
    max_len says otherwise."""
    if max_len is None:
        max_len = getattr(model.config, "max_seq_len", 512)
        max_len -= model.extra_positions
    return max_len - reserve


def _device(model):
    return next(model.parameters()).device


def _pad_id(tok, is_t5, model):
    if is_t5:
        return model.config.pad_id
    return tok.pad_id if tok.pad_id is not None else 0  # masked out anyway


# --------------------------------------------------------------------------- rank classification


def rank_classify(model, tok, rows, template, labels, batch_size=32, max_len=None, progress=None):
    """Pick, for every row, the label with the highest log p(label | prompt).

    rows: [{"input", "target"}, ...], every target one of labels. max_len bounds prompt +
    label tokens as in training (`data.encode_example`; long prompts lose their left end),
    by default the model's context. T5 scores each label followed by EOS, as it is trained.
    Returns (accuracy, predictions: list of label strings, probabilities: (N, L) float
    tensor, the softmax over the labels' scores). progress: called as progress(rows done, rows)
    after every batch (a `minipt.progress.Progress`).
    """
    scores = label_scores(model, tok, rows, template, labels, batch_size, max_len, progress)[:, 0]
    best = scores.argmax(-1).tolist()
    predictions = [labels[i] for i in best]
    return _accuracy(predictions, rows), predictions, scores.softmax(-1)


def label_scores(model, tok, rows, template, labels, batch_size=32, max_len=None, progress=None):
    """(N, K, L) log p(label | prompt) of every row and label under each of the model's K
    members (K = 1 but for an `Ensemble`)."""
    if not labels:
        raise ValueError("rank_classify: no labels")
    unknown = {r["target"] for r in rows} - set(labels)
    if unknown:
        raise ValueError(f"rank_classify: target {sorted(unknown)[0]!r} is not one of the labels {labels}")
    max_len = _limit(model, max_len)
    label_ids = [encode_text(tok, label) for label in labels]
    progress = progress or (lambda done, total: None)
    is_t5 = model.config.model_type == "t5"
    with _evaluating(model):
        if not is_t5 and all(len(ids) == 1 for ids in label_ids):
            return _single_token_scores(model, tok, rows, template, [ids[0] for ids in label_ids], batch_size,
                                        max_len, progress)
        return _label_scores(model, tok, rows, template, labels, is_t5, batch_size, max_len, progress)


def _accuracy(predictions, rows) -> float:
    return sum(p == r["target"] for p, r in zip(predictions, rows)) / max(len(rows), 1)


def _single_token_scores(model, tok, rows, template, label_tokens, batch_size, max_len, progress):
    """Every label is one token: one forward per batch reads them all off the last position.

    Prompts are left-padded so that every row's last prompt token sits in the last column.
    """
    prompts = [encode_prompt(tok, template.format(input=r["input"]))[-(max_len - 1):] for r in rows]
    K = model.n_members
    scores = torch.empty(len(rows), K, len(label_tokens), device="cpu")
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths, little padding
    pad_id, device = _pad_id(tok, False, model), _device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in chunk], pad_id)
        padded = bool((mask == 0).any())
        logits, _ = model(ids.to(device), attention_mask=mask.to(device) if padded else None, last_only=True)
        logp = logits[:, -1].float().log_softmax(-1)                       # (B * K, V)
        scores[chunk] = logp[:, label_tokens].view(len(chunk), K, -1).cpu()
        progress(start + len(chunk), len(rows))
    return scores


def _label_scores(model, tok, rows, template, labels, is_t5, batch_size, max_len, progress):
    """General case: one sequence per (row, label) pair, the label's token log-probs summed."""
    pairs = [encode_example(tok, template, {"input": r["input"], "target": label}, max_len, is_t5)
             for r in rows for label in labels]
    inputs = "input_ids" if is_t5 else "idx"
    K = model.n_members
    scores = torch.empty(len(pairs), K, device="cpu")
    order = sorted(range(len(pairs)), key=lambda j: len(pairs[j][inputs]))
    pad_id, device = _pad_id(tok, is_t5, model), _device(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([pairs[j][inputs] for j in chunk], pad_id, left=False)
        targets, _ = pad_batch([pairs[j]["targets"] for j in chunk], -100, left=False)
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        if is_t5:
            # decoder reads targets shifted right
            logits, _ = model(ids, targets=targets, attention_mask=mask)
        else:
            logits, _ = model(ids, attention_mask=mask)
        # (B, T, V); a no-op for any model that returns only its input columns
        logits = logits[:, -targets.size(1):]
        targets = targets.repeat_interleave(K, 0)                         # an ensemble returns K rows per row
        scored = targets != -100
        picked = logits[scored].float()                                   # (K, V): only the label positions
        token_logp = picked.gather(-1, targets[scored][:, None]).squeeze(-1) - picked.logsumexp(-1)
        row_of = torch.arange(targets.size(0), device=device)[:, None].expand_as(targets)[scored]
        summed = torch.zeros(targets.size(0), device=device).index_add_(0, row_of, token_logp)
        scores[chunk] = summed.view(len(chunk), K).cpu()
        progress((start + len(chunk)) // len(labels), len(rows))     # rows' worth of (row, label) pairs
    return scores.view(len(rows), len(labels), K).transpose(1, 2)


# --------------------------------------------------------------------------- prompt ensembles


class Ensemble(torch.nn.Module):
    """K prompts of one PromptBank as one model: each input row is run once per member, all
    in the same mixed batch, so an ensemble costs one batched forward (Lester et al. 2021 §5)."""

    def __init__(self, bank, members):
        super().__init__()
        self.bank, self.members, self.n_members = bank, list(members), len(members)
        self._bound = {}  # batch size -> the bank bound to its B * K rows (their layout built once)

    @property
    def config(self):
        return self.bank.config

    @property
    def extra_positions(self) -> int:  # context the members' prompts take (see _limit)
        return self.bank.batch_layout(self.members)["extra_positions"]

    def forward(self, idx, attention_mask=None, **kwargs):
        """(B, ...) inputs -> (B * K, ...) outputs, row b's members at rows b*K .. b*K + K-1."""
        B = idx.size(0)
        if B not in self._bound:
            self._bound[B] = self.bank.for_rows(self.members * B)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(self.n_members, 0)
        return self._bound[B](idx.repeat_interleave(self.n_members, 0), attention_mask=mask, **kwargs)


def ensemble_classify(bank, members, tok, rows, template, labels, batch_size=32, max_len=None) -> dict:
    """Rank classification by each member and by the ensemble, combined two ways: the mean of
    the members' log-probabilities, and a majority vote (ties go to the higher mean).

    Returns {"members": [accuracy per member], "mean": accuracy, "vote": accuracy,
    "predictions": {"mean": [...], "vote": [...]}}.
    """
    # (N, K, L)
    scores = label_scores(Ensemble(bank, members), tok, rows, template, labels, batch_size, max_len)
    mean = scores.mean(1)                                                        # (N, L)
    votes = torch.zeros_like(mean).scatter_add_(1, scores.argmax(-1), torch.ones_like(scores[..., 0]))
    by_vote = (votes + 1e-3 * mean.softmax(-1)).argmax(-1)                  # a tie goes to the higher mean
    pick = lambda best: [labels[i] for i in best.tolist()]
    predictions = {"mean": pick(mean.argmax(-1)), "vote": pick(by_vote)}
    return {"members": [_accuracy(pick(scores[:, k].argmax(-1)), rows) for k in range(len(members))],
            "mean": _accuracy(predictions["mean"], rows), "vote": _accuracy(predictions["vote"], rows),
            "predictions": predictions}


# --------------------------------------------------------------------------- generation metrics


def _words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits; on ASCII text this is rouge_score's default tokenizer."""
    return re.findall(r"[^\W_]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of two texts; 0.0 when either has no words."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return 0.0
    # LCS length by dynamic programming, one row of the table at a time
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal up to case and whitespace, else 0.0."""
    normal = lambda s: " ".join(s.lower().split())
    return float(normal(prediction) == normal(reference))


def generate_predictions(model, tok, rows, template, max_new_tokens, batch_size=16, max_len=None,
                         progress=None):
    """Greedy continuations of each row's prompt, decoded to text (EOS and specials dropped).

    Decoder prompts are cut from the left so prompt + new tokens fit the context. progress:
    as in rank_classify.
    """
    is_t5 = model.config.model_type == "t5"
    limit = _limit(model, max_len, reserve=0 if is_t5 else max_new_tokens)
    prompts = []
    for r in rows:
        text = template.format(input=r["input"])
        # T5 keeps its EOS
        prompts.append(tok.encode(text)[-limit:] if is_t5 else encode_prompt(tok, text)[-limit:])
    texts = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    pad_id = _pad_id(tok, is_t5, model)
    with _evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            new = generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_id=tok.eos_id,
                           pad_id=pad_id)
            for i, ids in zip(chunk, new):
                texts[i] = tok.decode(ids, skip_special=True)
            if progress:
                progress(start + len(chunk), len(rows))
    return texts


def evaluate_generation(model, tok, rows, template, max_new_tokens, batch_size=16, max_len=None,
                        progress=None) -> dict:
    """Greedy generation scored against each row's target: {"rougeL": mean, "exact_match": mean}."""
    predictions = generate_predictions(model, tok, rows, template, max_new_tokens, batch_size, max_len,
                                       progress)
    n = max(len(rows), 1)
    return {"rougeL": sum(rouge_l(p, r["target"]) for p, r in zip(predictions, rows)) / n,
            "exact_match": sum(exact_match(p, r["target"]) for p, r in zip(predictions, rows)) / n}


# --------------------------------------------------------------------------- command line


def main(argv=None):
    """python -m minipt.evaluation --data sentiment PROMPT [PROMPT ...]

    Rank-classification accuracy of each prompt file on a task's split, and with several
    prompts (say, one task trained with different seeds) the ensemble's."""
    import sys
    from pathlib import Path

    from .checkpoint import check_checkpoint, load_base
    from .cli import ArgumentParser
    from .data import check_template
    from .prompts.files import check_fingerprint, checkpoint_fingerprint, read_prompt
    from .prompts.mixed import PromptBank
    from .tasks import load_task
    ap = ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="+", help="prompt files trained on --base")
    ap.add_argument("--base", default="weights/smollm2-135m-instruct")
    ap.add_argument("--data", default="sentiment", help="built-in task or JSONL path")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--template", default=None)
    args = ap.parse_args(argv)
    try:  # everything checked before the model loads
        _, tok = check_checkpoint(args.base)
        task = load_task(args.data)
        if not task.labels:
            raise ValueError(f"{args.data}: not a classification task (no label set)")
        if args.template:
            check_template(args.template)
        here = checkpoint_fingerprint(args.base, tok)
        for path in args.prompts:
            check_fingerprint(path, read_prompt(path)[0], here)
        base, tok = load_base(args.base)
        bank = PromptBank(base)
        names = [f"{i}:{Path(p).stem}" for i, p in enumerate(args.prompts)]
        for name, path in zip(names, args.prompts):
            bank.add(name, path, tok)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    rows = task.splits[args.split]
    result = ensemble_classify(bank, names, tok, rows, args.template or task.template, task.labels)
    print(f"{task.name} {args.split} ({len(rows)} rows), rank-classification accuracy")
    for path, acc in zip(args.prompts, result["members"]):
        print(f"  {100 * acc:5.1f} %  {path}")
    if len(names) > 1:
        print(f"  {100 * result['mean']:5.1f} %  ensemble, mean log-probability")
        print(f"  {100 * result['vote']:5.1f} %  ensemble, majority vote")


if __name__ == "__main__":
    main()
