"""Model configurations: one dataclass per model family, saved as `config.json` in every
checkpoint directory so a checkpoint always knows how to rebuild its model (`model_type`
tells the families apart: "gpt" or "t5"). The training configuration is in train_config.py.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GPTConfig:
    """Decoder-only transformer. The defaults are GPT-2 small; Llama-family models
    (SmolLM2, TinyLlama, Qwen2) switch norm, MLP, positions and biases; Gemma 3 also
    the embedding scale, q/k norms, post-norms and local sliding-window layers."""
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12          # < n_head means grouped-query attention
    n_embd: int = 768
    head_dim: int = 64
    intermediate_size: int = 3072
    max_seq_len: int = 1024      # context length (size of GPT-2's position table)
    norm: str = "layernorm"      # "layernorm" (GPT-2) | "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"            # "gelu" (GPT-2, tanh approximation) | "swiglu" (Llama) | "geglu" (Gemma)
    pos: str = "learned"         # "learned" absolute positions | "rope"
    rope_base: float = 10000.0
    qkv_bias: bool = True        # GPT-2 and Qwen2 have biases on q, k, v
    proj_bias: bool = True       # GPT-2 also has them on the output and MLP projections
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    # Gemma 3 (all off for the others)
    embed_scale: bool = False    # token embeddings times sqrt(n_embd), in the embedding's dtype
    qk_norm: bool = False        # RMSNorm over each head of q and k, before RoPE
    post_norms: bool = False     # also norm the attention and MLP outputs before the residual add
    query_pre_attn_scalar: float = 0.0  # softmax scale 1/sqrt(this); 0 means 1/sqrt(head_dim)
    sliding_window: int = 0      # > 0: local layers see only the last this many tokens
    global_every: int = 1        # with a window, every Nth layer (N-1, 2N-1, ...) is global
    rope_local_base: float = 10000.0  # the local layers' RoPE base (rope_base is the global one)
    source: str = "gpt2"         # the checkpoint family it came from: gpt2 | llama | qwen2 | gemma3
    model_type: str = "gpt"


@dataclass
class T5Config:
    """Encoder-decoder transformer. The defaults are t5-small (v1.0); v1.1 and Flan-T5
    use the gated-GELU feed-forward and an untied LM head."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    n_layer: int = 6             # encoder layers
    n_decoder_layer: int = 6
    n_head: int = 8
    rel_buckets: int = 32        # relative position buckets
    rel_max_distance: int = 128
    norm_eps: float = 1e-6
    ff: str = "relu"             # "relu" (v1.0) | "gated-gelu" (v1.1, Flan-T5)
    tie_embeddings: bool = True  # v1.0 ties the LM head and rescales by d_model**-0.5
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    model_type: str = "t5"


CONFIGS = {"gpt": GPTConfig, "t5": T5Config}


def config_from_dict(d: dict):
    """Rebuild a config from its JSON form, rejecting keys the dataclass does not know."""
    kind = d.get("model_type")
    if kind not in CONFIGS:
        raise ValueError(f"config: model_type must be one of {sorted(CONFIGS)}, got {kind!r}")
    cls = CONFIGS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config: unknown keys for {cls.__name__}: {', '.join(unknown)}")
    return cls(**d)


def load_config(directory) -> "GPTConfig | T5Config":
    path = Path(directory) / "config.json"
    try:
        return config_from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (is {directory} a minipt checkpoint?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def save_config(config, directory) -> None:
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
