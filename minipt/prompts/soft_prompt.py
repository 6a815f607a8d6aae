"""Soft prompt tuning (Lester, Al-Rfou, Constant 2021, *The Power of Scale for
Parameter-Efficient Prompt Tuning*): P learned vectors placed before the input tokens.

Trainable parameters = P x d_model (100 tokens on T5-Small's d_model 512 = 51,200).

Initialisation (§3.2 of the paper): `random` uniform in [-0.5, 0.5]; `vocab` embeddings of
tokens sampled from the 5,000 most common ones; `text` the embeddings of a string,
repeated or truncated to length; `labels` the class-label embeddings first, then sampled
vocabulary. The token vocabularies here are ordered roughly by frequency (BPE by merge
order, sentencepiece by score), so "most common" is taken as the lowest ids after the
special tokens.
"""
import torch
import torch.nn as nn

from .base import PromptConfig, PromptMethod, model_dims

COMMON_TOKENS = 5000


def _regular_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """The first COMMON_TOKENS non-special token ids."""
    special = set(getattr(tokenizer, "special_tokens", {}).values()) if tokenizer is not None else set()
    special |= {i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None),
                            getattr(tokenizer, "bos_id", None)) if i is not None}
    ids = [i for i in range(min(vocab_size, COMMON_TOKENS + len(special))) if i not in special]
    return torch.tensor(ids[:COMMON_TOKENS])


def _sampled_ids(tokenizer, vocab_size: int, n: int, seed: int) -> list:
    common = _regular_ids(tokenizer, vocab_size)
    return common[torch.randint(0, len(common), (n,), generator=torch.Generator().manual_seed(seed))].tolist()


def initial_token_ids(cfg: PromptConfig, tokenizer, vocab_size: int, n: int) -> list:
    """n token ids for init "vocab" (sampled from the most common tokens) or "text" (the
    text's ids, repeated or truncated to n)."""
    if cfg.init == "vocab":
        return _sampled_ids(tokenizer, vocab_size, n, cfg.seed)
    if tokenizer is None:
        raise ValueError("prompt init 'text' needs the tokenizer")
    ids = _encode(tokenizer, cfg.init_text)
    if not ids:
        raise ValueError("prompt init 'text' needs a non-empty init_text")
    return (ids * (n // len(ids) + 1))[:n]


def embedding_scale(base) -> float:
    """What the base multiplies its token embeddings by (Gemma: sqrt(d_model), else 1). A prompt
    goes in as embeddings, after that scale, so a prompt made of token vectors takes it too."""
    scale = getattr(base.embed, "scale", None)
    return scale().item() if scale is not None else 1.0


def initial_prompt(cfg: PromptConfig, embed: nn.Module, tokenizer, n: int,
                   scale: float = 1.0) -> torch.Tensor:
    """(n, C) starting vectors for a soft prompt, as the config's `init` says; token vectors
    are rows of the base's token embedding `embed` times `scale` (see embedding_scale), so
    that a prompt initialised from a text is that text's input, exactly."""
    V, C = embed.num_embeddings, embed.embedding_dim

    def rows(ids) -> torch.Tensor:                       # (len(ids), C) fp32 on the CPU
        ids = torch.tensor(ids, dtype=torch.long, device="cpu")
        # a quantized embedding dequantizes just these rows (minipt.quantized)
        x = embed.rows(ids) if hasattr(embed, "rows") else embed.weight.detach()[ids.to(embed.weight.device)]
        return x.float().cpu() * scale

    if cfg.init == "random":
        return torch.rand(n, C, generator=torch.Generator().manual_seed(cfg.seed)) - 0.5
    if cfg.init in ("vocab", "text"):
        return rows(initial_token_ids(cfg, tokenizer, V, n))
    if cfg.init == "labels":
        if tokenizer is None:
            raise ValueError("prompt init 'labels' needs the tokenizer")
        if not cfg.init_labels:
            raise ValueError("prompt init 'labels' needs init_labels")
        # a label of several tokens starts as the mean of their embeddings, then sampled vocabulary
        labels = [rows(_encode(tokenizer, lab)).mean(0) for lab in cfg.init_labels][:n]
        rest = n - len(labels)
        sampled = rows(_sampled_ids(tokenizer, V, max(rest, 0), cfg.seed))
        return torch.cat([torch.stack(labels), sampled])
    raise ValueError(f"prompt init {cfg.init!r} unknown; choose random, vocab, text or labels")


def _encode(tokenizer, text: str) -> list:
    """Token ids without the EOS sentencepiece tokenizers append."""
    try:
        return tokenizer.encode(text, add_eos=False)
    except TypeError:
        return tokenizer.encode(text)


class SoftPrompt(PromptMethod):
    uses = ("num_virtual_tokens", "init", "init_text", "init_labels", "placement")
    choices = {"init": ("text", "vocab", "labels", "random"), "placement": ("encoder", "decoder")}
    holds_soft_prompt = True
    peft_type = "PROMPT_TUNING"

    @classmethod
    def recipe(cls, config):
        # Lester et al.: Adafactor at lr 0.3 (config/t5_small_sentiment.py); AdamW here.
        # SmolLM2-135M, 200 steps of 16, 3 seeds: 86.0 % sentiment, 93.5 % topic
        return dict(lr=3e-2, warmup_steps=10)

    @classmethod
    def virtual_positions(cls, config):
        return config.num_virtual_tokens

    def __init__(self, config: PromptConfig, base, tokenizer=None):
        super().__init__(config)
        self.n_input_tokens = config.num_virtual_tokens
        self.d_model = model_dims(base)["d_model"]
        self.prompt = nn.Parameter(initial_prompt(config, base.embed, tokenizer,
                                                  config.num_virtual_tokens, embedding_scale(base)))

    def input_prompt(self):
        return self.prompt                                                    # (P, C)

    def closed_form_parameters(self) -> int:
        return self.n_input_tokens * self.d_model

    def describe_count(self) -> str:
        return f"{self.n_input_tokens} tokens x d_model {self.d_model}"
