"""Decoding from 4-bit codes (minipt.packed): the codes found in fp32 weights are the ones the
gguf library wrote; the packed product is the fp32 one up to bf16 rounding and is used only
where it may be; on SmolLM2, next-token distributions stay closer to fp32 than in bf16."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

import generate as generate_cli
from minipt import fast, packed
from minipt.checkpoint import load_base
from minipt.config import GPTConfig
from minipt.generation import generate, stepwise_logits
from minipt.gpt import GPT
from minipt.layers import Linear, SelfAttention, project
from minipt.prompts.lora import LoRALinear


def gguf_blocks(w, kind):
    """(raw blocks (N, K/32, bytes), the fp32 weights the converter makes of them)."""
    qtype = getattr(GGMLQuantizationType, kind)
    raw = quants.quantize(w.numpy(), qtype)
    expanded = torch.from_numpy(np.array(quants.dequantize(raw, qtype), dtype=np.float32))
    return raw.reshape(w.size(0), w.size(1) // 32, -1), expanded


def q4_1_like(*shape):
    """Random weights as a Q4_1 GGUF file holds them; the first block constant (its d is 0)."""
    w = torch.randn(*shape) * 0.05
    w[0, :32] = 0.01
    return gguf_blocks(w, "Q4_1")[1]


def q4_1_gpt(vocab_size=128, max_seq_len=128):
    """A random 2-layer Llama-style model whose projections and head hold Q4_1 grids, as
    converted from a GGUF file (the embedding stays fp32)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
                    intermediate_size=96, max_seq_len=max_seq_len, norm="rmsnorm", mlp="swiglu", pos="rope",
                    qkv_bias=False, proj_bias=False, tie_embeddings=False, source="llama")
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "embed.weight":
                p.copy_(gguf_blocks(p.detach(), "Q4_1")[1])
    return model


def test_q4_1_codes_are_the_gguf_blocks():
    raw, w = gguf_blocks(q4_1_like(64, 96), "Q4_1")                # block: d, m (fp16), 16 bytes of nibbles
    q, d, m = packed.q4_1_codes(w)
    nibbles = torch.from_numpy(raw[..., 4:].astype(np.int32))
    assert torch.equal(q.view(64, 3, 32), torch.cat([nibbles & 15, nibbles >> 4], -1))
    assert torch.equal(d, torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)))
    assert torch.equal(m, torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)))


def test_q8_0_codes_are_the_gguf_blocks():
    raw, w = gguf_blocks(torch.randn(64, 96), "Q8_0")             # block: d (fp16), 32 int8
    q, d = packed.q8_0_codes(w)
    assert torch.equal(q.view(64, 3, 32),
                       torch.from_numpy(raw[..., 2:].copy().view(np.int8).astype(np.int32)))
    assert torch.equal(d, torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)))


def test_weights_without_exact_codes_are_left_alone():
    w = torch.randn(64, 96)
    assert packed.q4_1_codes(w) is None and packed.q8_0_codes(w) is None
    assert packed.q4_1_codes(gguf_blocks(w, "Q8_0")[1]) is None     # 8-bit codes are no 4-bit grid
    assert packed.pack_for_decoding(SelfAttention(96, 3, 1, 32, False, False)) == 0


def bf16_close(y, ref):
    """Equal up to the kernel's bf16 rounding of inputs, scales and outputs; a wrong layout of
    codes or scales is off by the size of the weights themselves."""
    torch.testing.assert_close(y, ref, rtol=0.02, atol=0.01 * ref.abs().max().item())


@pytest.mark.parametrize("few_rows", [0, 8])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_packed_product_is_the_fp32_product_and_only_for_few_rows(kind, few_rows, monkeypatch):
    """Where the packed product does not apply, `lin` gives the fp32 product the code intends:
    F.linear's when FEW_ROWS is 0 (Intel), the row-block one for a few rows when it is 8 (AMD).
    Both branches run on either CPU."""
    monkeypatch.setattr(fast, "FEW_ROWS", few_rows)
    lin = Linear(96, 64, bias=True)
    with torch.no_grad():
        lin.weight.copy_(gguf_blocks(torch.randn(64, 96) * 0.05, kind)[1])
    assert packed.pack_for_decoding(lin) == 1
    assert len(lin.packed.planes) == (1 if kind == "Q4_1" else 2)
    with torch.no_grad():
        few = torch.randn(2, 3, 96)                                  # 6 rows: packed
        bf16_close(lin(few), F.linear(few, lin.weight, lin.bias))
        assert not torch.equal(lin(few), fast.linear(few, lin.weight, lin.bias))
        many = torch.randn(packed.MAX_ROWS + 1, 96)                  # exact fp32 product
        assert torch.equal(lin(many), F.linear(many, lin.weight, lin.bias))
    assert torch.equal(lin(few), F.linear(few, lin.weight, lin.bias))   # autograd on: exact
    with torch.no_grad():
        lin.weight.mul_(2)                                           # updated after packing: the stale
        exact = fast.linear(few, lin.weight, lin.bias)             # codes are not used
        assert torch.equal(lin(few), exact)
        if few_rows == 0:
            assert torch.equal(exact, F.linear(few, lin.weight, lin.bias))


def test_stacked_projections_and_a_lora_wrapped_after_packing():
    attn = SelfAttention(96, 3, 1, 32, False, False)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            lin.weight.copy_(q4_1_like(*lin.weight.shape))
    assert packed.pack_for_decoding(attn) == 4
    assert attn.packed_projections.sizes == [96, 32, 32]
    names = attn.fusable_projections
    with torch.no_grad():
        x = torch.randn(1, 1, 96)
        for stacked, alone in zip(project(attn, x, names), [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]):
            bf16_close(stacked, alone)
        attn.q_proj = LoRALinear(attn.q_proj, r=2, alpha=2, dropout=0.0)
        attn.q_proj.lora_B.fill_(0.1)
        q, k, v = project(attn, x, names)                            # the LoRA update must not be skipped
        assert torch.equal(q, attn.q_proj(x)) and torch.equal(k, attn.k_proj(x))


def next_token_logprobs(model, seqs):
    return torch.cat([stepwise_logits(model, seq) for seq in seqs]).log_softmax(-1)


def test_smollm2_packed_decoding_stays_closer_to_fp32_than_bf16(smollm2_dir):
    model, tok = load_base(smollm2_dir)
    n_linear = sum(isinstance(m, Linear) for m in model.modules())
    texts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    seqs = [tok.encode(t) + out for t, out in zip(texts, generate(model, [tok.encode(t) for t in texts], 24,
                                                                     pad_id=tok.pad_id))]
    fp32 = next_token_logprobs(model, seqs)
    bf16 = next_token_logprobs(load_base(smollm2_dir, dtype=torch.bfloat16)[0], seqs)
    assert packed.pack_for_decoding(model) == n_linear              # Q4_1 projections, Q8_0 embedding/head
    ours = next_token_logprobs(model, seqs)
    kl = lambda logp: F.kl_div(logp, fp32, log_target=True, reduction="batchmean").item()
    assert kl(ours) < kl(bf16)
    assert (ours.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.95


def test_generate_cli_packed(smollm2_dir, capsys):
    generate_cli.main(["--base", str(smollm2_dir), "--chat", "--text", "What is the capital of France?",
                       "--packed"])
    out = capsys.readouterr()
    assert "Paris" in out.out and ", packed]" in out.err
