"""Bases in the real shapes with random weights, for benchmarking where the real ones cannot
be fetched (a GPU machine without network): what a step or a decoded token costs depends
on the shapes, not on the values.

`build(name)` writes, once, a transformers directory (config.json + model.safetensors, the
peer's side) and the minipt checkpoint converted from it by minipt's own converter, both
with a byte-level tokenizer made here (ChatML specials, then the 256 bytes, as
tests/test_serve.py's tiny one): every prompt encodes, a byte a token. Returns
(minipt_dir, hf_dir).

    python bench/random_bases.py smollm2-135m qwen2.5-0.5b     # prints the two directories of each
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_ROOT = ROOT / "out" / "random-bases"   # git-ignored

# transformers configs of the real models (their config.json), vocabulary and all
SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attention_bias=False)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)),
}

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer():
    """ChatML specials at 0-2 (<|endoftext|> pads), then one token per byte value."""
    from minipt.tokenizer import BPETokenizer, _spell
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab = {_spell(bytes([b])): 3 + b for b in range(256)}
    return BPETokenizer({**vocab, **specials}, [], specials, bos_id=1, eos_id=2, pad_id=0, chat_template=CHATML)


def build(name: str, root: Path = DEFAULT_ROOT) -> tuple[Path, Path]:
    """(minipt checkpoint dir, transformers dir) of the random base `name` in SHAPES, built
    on the first call (seeded: the same weights every time), found on later ones."""
    import torch
    import transformers
    from minipt.convert import convert
    if name not in SHAPES:
        raise SystemExit(f"unknown random base {name!r} (known: {', '.join(SHAPES)})")
    hf_dir, minipt_dir = Path(root) / name / "hf", Path(root) / name / "minipt"
    if not (minipt_dir / "model.safetensors").exists():
        kind, fields = SHAPES[name]
        torch.manual_seed(0)
        config = getattr(transformers, kind)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        hf_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(hf_dir)
        byte_tokenizer().save(hf_dir)
        del model
        convert(hf_dir, minipt_dir, force=True)
    return minipt_dir, hf_dir


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(SHAPES):
        print(arg, *build(arg))
