"""Evaluation: ROUGE-L against hand-worked cases and the rouge_score package, rank
classification against brute-force scoring on tiny random models, base and prompted, and
zero-shot sentiment on the real SmolLM2."""
import pytest
import torch

from minipt.checkpoint import load_base
from minipt.config import GPTConfig, T5Config
from minipt.evaluation import (Ensemble, ensemble_classify, evaluate_generation, exact_match,
                               generate_predictions, label_scores, rank_classify, rouge_l)
from minipt.fetch import fetch
from minipt.gpt import GPT
from minipt.prompts import PromptConfig, attach
from minipt.prompts.mixed import PromptBank
from minipt.t5 import T5
from minipt.tasks import load_task
from minipt.tokenizer import SentencePieceTokenizer, load_tokenizer

# --------------------------------------------------------------------------- ROUGE-L

ROUGE_CASES = [
    # prediction, reference, F worked out by hand
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),          # LCS "the cat on the mat"
    ("police killed the gunman", "the gunman was shot by police", 0.4),   # LCS 2: P 2/4, R 2/6
    ("The CAT!", "the cat", 1.0),                                         # case and punctuation ignored
    ("a b c d", "d c b a", 0.25),                                         # LCS 1 of 4 and 4
    ("completely different", "nothing shared", 0.0),
    ("", "the cat", 0.0),
    ("...", "the cat", 0.0),
]


@pytest.mark.parametrize("prediction, reference, expected", ROUGE_CASES)
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert rouge_l(reference, prediction) == pytest.approx(expected)    # F1 is symmetric


def test_rouge_l_matches_rouge_score():
    texts = [(p, r) for p, r, _ in ROUGE_CASES] + [
        ("Police have arrested a man after a woman was stabbed in Leeds city centre.",
         "A man has been arrested after a woman was stabbed in the centre of Leeds."),
        ("The 26-year-old striker joined on a three-year deal, the club said.",
         "Striker Sam, 26, has signed a three-year contract with the club."),
    ]
    from rouge_score import rouge_scorer          # a test dependency: the oracle
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for p, r in texts:
        assert rouge_l(p, r) == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure)


def test_exact_match():
    assert exact_match(" Paris", "paris") == 1.0
    assert exact_match("New  York ", "new york") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0


# --------------------------------------------------------------------------- rank classification


@pytest.fixture(scope="module")
def bpe(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def tiny_gpt(vocab_size):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                    intermediate_size=64, max_seq_len=256, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qkv_bias=False, proj_bias=False, source="llama")
    model = GPT(cfg)
    with torch.no_grad():
        model.embed.weight.mul_(0.1)  # tied head: keep the logits in a range where labels compete
    return model.eval()


def tiny_t5(vocab_size):
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, n_layer=2, n_decoder_layer=2,
                        n_head=4, ff="gated-gelu", tie_embeddings=False))
    return model.eval()


ROWS = [{"input": text, "target": target} for text, target in [
    ("a gripping, beautiful film", " positive"),
    ("dull", " negative"),
    ("the plot never quite comes together, and the second half drags badly", " negative"),
    ("fun", " positive"),
    ("one of the year's best", " positive"),
]]
TEMPLATE = "Review: {input}\nSentiment:"


def brute_force(model, prompts, label_ids, is_t5):
    """(N, L) label log-probs, one unpadded sequence per row and label."""
    scores = torch.zeros(len(prompts), len(label_ids))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, label in enumerate(label_ids):
                if is_t5:
                    logits, _ = model(torch.tensor([prompt]), targets=torch.tensor([label]))
                    logp = logits[0, -len(label):].float().log_softmax(-1)
                    scores[i, j] = sum(logp[k, t] for k, t in enumerate(label))
                else:
                    seq = prompt + label
                    logits, _ = model(torch.tensor([seq]))
                    # a prompted model may put its virtual columns first
                    logp = logits[0, -len(seq):].float().log_softmax(-1)
                    scores[i, j] = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(label))
    return scores


@pytest.mark.parametrize("labels", [[" negative", " positive"],              # one token each: the fast path
                                    [" rather dull", " truly great"],        # two tokens each
                                    [" not good at all", " great"],          # four tokens against one
                                    [" very good", " very bad"]])            # the same first token
@pytest.mark.parametrize("prompted", [False, True])
def test_rank_classify_equals_brute_force_decoder(bpe, labels, prompted):
    model = tiny_gpt(bpe.vocab_size)
    if prompted:
        model = attach(model, PromptConfig(num_virtual_tokens=4, init="random"))
    rows = [dict(r, target=labels[r["target"] == " positive"]) for r in ROWS]
    prompts = [bpe.encode(TEMPLATE.format(input=r["input"])) for r in rows]
    expected = brute_force(model, prompts, [bpe.encode(label) for label in labels], False).log_softmax(-1)
    model.train()
    acc, predictions, probs = rank_classify(model, bpe, rows, TEMPLATE, labels, batch_size=3)
    assert model.training                                                # the caller's mode comes back
    # compared in log space: with labels of different lengths the probabilities saturate
    assert probs.shape == (len(rows), 2) and torch.allclose(probs.log(), expected, atol=1e-4)
    assert predictions == [labels[k] for k in expected.argmax(-1).tolist()]
    assert acc == sum(p == r["target"] for p, r in zip(predictions, rows)) / len(rows)


@pytest.mark.parametrize("labels", [[" negative", " positive"], [" not good at all", " great"]])
def test_ensemble_members_and_combinations_equal_each_prompt_scored_alone(bpe, labels):
    base = tiny_gpt(bpe.vocab_size)
    bank = PromptBank(base)
    members = [attach(base, PromptConfig(num_virtual_tokens=3 + k, init="random", seed=k)) for k in range(3)]
    for k, m in enumerate(members):
        bank.add(f"seed{k}", m)
    rows = [dict(r, target=labels[r["target"] == " positive"]) for r in ROWS]
    prompts = [bpe.encode(TEMPLATE.format(input=r["input"])) for r in rows]
    label_ids = [bpe.encode(label) for label in labels]
    alone = torch.stack([brute_force(m, prompts, label_ids, False) for m in members], 1)   # (N, K, L)
    scores = label_scores(Ensemble(bank, ["seed0", "seed1", "seed2"]), bpe, rows, TEMPLATE, labels,
                          batch_size=2)
    # each member's own scores
    assert torch.allclose(scores, alone, atol=1e-4)
    result = ensemble_classify(bank, ["seed0", "seed1", "seed2"], bpe, rows, TEMPLATE, labels, batch_size=2)
    for k, m in enumerate(members):
        assert result["members"][k] == rank_classify(m, bpe, rows, TEMPLATE, labels)[0]
    assert result["predictions"]["mean"] == [labels[i] for i in alone.mean(1).argmax(-1).tolist()]
    votes = torch.nn.functional.one_hot(alone.argmax(-1), len(labels)).sum(1)             # (N, L)
    for i, vote in enumerate(result["predictions"]["vote"]):
        assert votes[i, labels.index(vote)] == votes[i].max()


def test_rank_classify_equals_brute_force_t5():
    tok = SentencePieceTokenizer(fetch("t5-spiece"))
    model = tiny_t5(tok.vocab_size)
    labels = ["negative", "positive"]
    rows = [dict(r, target=r["target"].strip()) for r in ROWS]
    prompts = [tok.encode(f"sst2 sentence: {r['input']}") for r in rows]
    expected = brute_force(model, prompts, [tok.encode(label) for label in labels], True).log_softmax(-1)
    acc, predictions, probs = rank_classify(model, tok, rows, "sst2 sentence: {input}", labels, batch_size=4)
    assert torch.allclose(probs.log(), expected, atol=1e-4)
    assert predictions == [labels[k] for k in expected.argmax(-1).tolist()]


def test_rank_classify_rejects_unknown_targets(bpe):
    with pytest.raises(ValueError, match="not one of the labels"):
        rank_classify(tiny_gpt(bpe.vocab_size), bpe, ROWS, TEMPLATE, ["negative", "positive"])


def test_generation_is_batch_independent(bpe):
    model = tiny_gpt(bpe.vocab_size)
    one = generate_predictions(model, bpe, ROWS, TEMPLATE, 6, batch_size=1)
    many = generate_predictions(model, bpe, ROWS, TEMPLATE, 6, batch_size=4)
    assert one == many and all(isinstance(p, str) for p in one)
    # the model's own output is a perfect answer
    rows = [dict(r, target=p) for r, p in zip(ROWS, one)]
    assert evaluate_generation(model, bpe, rows, TEMPLATE, 6)["exact_match"] == 1.0


# --------------------------------------------------------------------------- the real model


def test_smollm2_zero_shot_sentiment(smollm2_dir):
    model, tok = load_base(smollm2_dir, dtype=torch.bfloat16)
    task = load_task("sentiment")
    acc, predictions, probs = rank_classify(model, tok, task.splits["test"][:200], task.template, task.labels)
    print(f"SmolLM2-135M-Instruct zero-shot sentiment, first 200 test sentences: {acc:.1%}")
    assert acc > 0.65
    assert torch.allclose(probs.sum(-1), torch.ones(200))
    assert {" negative", " positive"} == set(predictions)   # not one class for everything
