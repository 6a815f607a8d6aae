"""The model protocol: what evaluation, generation and the server call on a model. The bare
`GPT` and `T5`, a `PromptedModel` and a `PromptBank` bound to its rows (`BoundRows`)
implement `DecodingModel`; an evaluation `Ensemble` scores only (`LanguageModel`). Callers
read these attributes instead of asking which kind of model they hold."""
from typing import Protocol, runtime_checkable


@runtime_checkable
class LanguageModel(Protocol):
    config: object               # GPTConfig or T5Config: model_type, max_seq_len, ...
    extra_positions: int         # context positions a prompt takes before the text (0: none)
    n_members: int               # output rows per input row: 1, or K for an ensemble of K prompts

    def __call__(self, idx, targets=None, *, attention_mask=None, last_only=False, loss_only=False):
        """(logits, loss) for token ids `idx` (B, T)."""


@runtime_checkable
class DecodingModel(LanguageModel, Protocol):
    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        """A static KV cache for `max_len` positions of text (the prompt's come on top)."""

    def clear_cache(self) -> None:
        """Free the cache."""
