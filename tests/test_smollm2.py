"""The real SmolLM2-135M-Instruct GGUF (Q4_1/Q8_0, dequantized) against transformers
reading the same file: logits, greedy text, and the chat answer people see first."""
import torch

from minipt.checkpoint import load_base
from minipt.generation import generate

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 5, 8, 13,",
    "Ünïcödé and emoji 🤖 are tokens too.",
]


def until_eos(ids, eos_id):
    """transformers' output up to (not including) EOS; later columns are padding."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def test_logits_match_transformers(smollm2_dir, hf_smollm2):
    model, tok = load_base(smollm2_dir)
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok.encode(text)])
            ours, _ = model(ids)
            assert (ours - hf_smollm2(ids).logits).abs().max() <= 1e-3, text


def test_batched_left_padded_logits_match(smollm2_dir, hf_smollm2):
    model, tok = load_base(smollm2_dir)
    from minipt.generation import pad_batch
    ids, mask = pad_batch([tok.encode(t) for t in TEXTS], tok.pad_id)
    with torch.no_grad():
        ours, _ = model(ids, attention_mask=mask)
        ref = hf_smollm2(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (ours - ref)[mask.bool()].abs().max() <= 1e-3


def test_greedy_continuations_match(smollm2_dir, hf_smollm2):
    model, tok = load_base(smollm2_dir)
    for text in TEXTS:
        prompt = tok.encode(text)
        (ours,) = generate(model, [prompt], 32, eos_id=tok.eos_id)
        ref = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert ours == until_eos(ref[0, len(prompt):].tolist(), tok.eos_id), text


def test_batched_greedy_matches_transformers_batched(smollm2_dir, hf_smollm2):
    from minipt.generation import pad_batch
    model, tok = load_base(smollm2_dir)
    prompts = [tok.encode(t) for t in TEXTS]
    ours = generate(model, prompts, 32, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ids, mask = pad_batch(prompts, tok.pad_id)
    ref = hf_smollm2.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                              pad_token_id=tok.pad_id)
    assert ours == [until_eos(r, tok.eos_id) for r in ref[:, ids.size(1):].tolist()]


def test_chat_answer(smollm2_dir):
    model, tok = load_base(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    (out,) = generate(model, [tok.encode(prompt)], 40, eos_id=tok.eos_id)
    assert "Paris" in tok.decode(out)


def test_float16_decoding_tracks_float32(smollm2_dir):
    """fp16 weights stay close to fp32: logits within 0.5 (their range is ~50) and the first
    16 greedy tokens the same."""
    m32, tok = load_base(smollm2_dir)
    m16, _ = load_base(smollm2_dir, dtype=torch.float16)
    for text in TEXTS:
        prompt = tok.encode(text)
        with torch.no_grad():
            ids = torch.tensor([prompt])
            assert (m32(ids)[0] - m16(ids)[0].float()).abs().max() <= 0.5, text
        (ours32,), (ours16,) = (generate(m, [prompt], 16, eos_id=tok.eos_id) for m in (m32, m16))
        assert ours16 == ours32, text
