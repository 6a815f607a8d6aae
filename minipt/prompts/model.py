"""`PromptedModel`: a frozen base model plus one prompt method, behaving like the base
(same forward, same `generate`) with the method's virtual tokens and prefixes in place.
Its logits line up with the caller's tokens: the virtual tokens' columns are dropped.

This is where the method-independent bookkeeping lives, written once:
  - the soft prompt goes right before each row's first real token, i.e. after any left
    padding (never before it), and the attention mask and targets grow to match;
  - positions are counted over real tokens (prompt included), so padding never shifts them;
    attention prefixes occupy `position_offset` positions before the text, as the
    past-key-values implementation of prefix tuning does (Li & Liang 2021);
  - with the KV cache, the prompt enters once, at prefill, and later positions shift by P;
  - without it (training, ranking), the virtual tokens run through the model once per batch,
    not once per row: they come first and attention is causal, so their keys and values are
    the same for every row, and the text attends to them as a prefix (GPT.forward's `shared`).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import fast
from .base import PromptMethod


def leading_pads(mask):
    """(B, T) 1/0 mask -> (B,) number of padding columns before the first real token."""
    return (mask.long().cumsum(-1) == 0).sum(-1)


def remove_at(x, at, P: int):
    """Undo insert_at: drop the P columns starting at at[b] of each row b -> (B, T, ...)."""
    B, TP = x.shape[:2]
    j = torch.arange(TP - P, device=x.device)[None, :]
    src = torch.where(j < at[:, None], j, j + P)                      # (B, T)
    trail = x.shape[2:]
    return x.gather(1, src.reshape(B, TP - P, *([1] * len(trail))).expand(B, TP - P, *trail))


def insert_at(x, rows, at):
    """Insert rows (B, P, ...) into x (B, T, ...) before column at[b] of each row b -> (B, T+P, ...)."""
    B, T = x.shape[:2]
    P = rows.size(1)
    j = torch.arange(T + P, device=x.device)[None, :]               # (1, T+P) output columns
    at = at[:, None]                                                 # (B, 1)
    in_prompt = (j >= at) & (j < at + P)                             # (B, T+P)
    from_x = torch.where(j < at, j, j - P).clamp(0, T - 1)
    from_rows = (j - at).clamp(0, P - 1)
    trail = x.shape[2:]
    gather = lambda t, idx: t.gather(1, idx.reshape(B, T + P, *([1] * len(trail))).expand(B, T + P, *trail))
    keep = in_prompt.reshape(B, T + P, *([1] * len(trail)))
    return torch.where(keep, gather(rows.to(x.dtype), from_rows), gather(x, from_x))


@dataclass
class Placed:
    """A decoder batch with its rows' prompt vectors in place (see place_prompt)."""
    x: torch.Tensor
    mask: torch.Tensor
    targets: "torch.Tensor | None"
    positions: torch.Tensor
    cache_pos: "int | None"
    at: "torch.Tensor | None"        # each row's first real column, where its prompt went
    P: int

    def without_prompt(self, logits, last_only):
        """The logits of the rows' own tokens: the prompt's columns taken out again."""
        if self.P and not self.cache_pos and not last_only and logits is not None:
            return remove_at(logits, self.at, self.P)
        return logits


def whole_mask(attention_mask, idx, cache_pos):
    """The attention mask as given, or, without one (no padding), ones over every position
    so far: the cached ones and the new `idx` (B, T)."""
    if attention_mask is not None:
        return attention_mask
    B, T = idx.shape
    return torch.ones(B, (cache_pos or 0) + T, dtype=torch.long, device=idx.device)


def place_prompt(x, mask, targets, P, vectors, vmask, offset, cache_pos) -> Placed:
    """Put each row's P prompt vectors (B, P, C) right after its left padding, with vmask
    (B, P) saying which are real, and count positions over the real tokens from `offset`
    (the positions an attention prefix takes). Past the prefill (cache_pos), the vectors are
    in the cache already: only the mask and the cache position make room for them. The one
    helper of PromptedModel (a prompt for the batch) and PromptBank (a prompt per row)."""
    at = None
    if P:
        at = leading_pads(mask)
        if not cache_pos:  # prefill or plain forward: the prompt enters here
            x = insert_at(x, vectors, at)
            if targets is not None:
                targets = insert_at(targets, targets.new_full((x.size(0), P), -100), at)
        else:
            cache_pos += P
        mask = insert_at(mask, vmask, at)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -x.size(1):] + offset
    return Placed(x, mask, targets, positions, cache_pos, at, P)


class PromptedModel(nn.Module):
    n_members = 1                          # one output row per input row (minipt.protocol.DecodingModel)

    def __init__(self, base: nn.Module, method: PromptMethod):
        super().__init__()
        base.requires_grad_(method.trains_base)  # frozen, bit for bit, unless fine-tuned in full
        self.base, self.method = base, method
        method.attach(base)
        self.is_t5 = base.config.model_type == "t5"

    @property
    def config(self):
        return self.base.config

    @property
    def n_prompt(self) -> int:
        return self.method.n_input_tokens

    @property
    def extra_positions(self) -> int:
        """Positions the method takes from the decoder's context before the text."""
        return 0 if self.is_t5 else self.n_prompt + self.method.position_offset

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---- the KV cache makes room for the virtual tokens --------------------------------

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        decoder_side = not self.is_t5 or self.method.config.placement == "decoder"
        self.base.setup_cache(batch_size, max_len + (self.n_prompt if decoder_side else 0), dtype, device)

    def clear_cache(self):
        self.base.clear_cache()

    # ---- decoder-only --------------------------------------------------------------------

    def forward(self, idx=None, targets=None, *, attention_mask=None, cache_pos=None, last_only=False,
                loss_only=False, decoder_input_ids=None):
        if self.is_t5:
            return self._t5_forward(idx, decoder_input_ids, targets, attention_mask)
        base = self.base
        B, T = idx.shape
        x = base.embed(idx)                                                   # (B, T, C)
        mask = whole_mask(attention_mask, idx, cache_pos)
        P = self.n_prompt
        prefixes = self.method.prefixes(B)
        window = base.config.sliding_window
        if P and cache_pos is None and not prefixes and fast.ENABLED and (not window or P + T <= window):
            # the text attends to the prompt's keys/values, computed once for the whole batch (a
            # prefix that every token sees: not where a sliding window would hide some of it)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + P
            return base(inputs_embeds=x, targets=targets, attention_mask=mask, position_ids=positions,
                        shared=self.method.input_prompt(), last_only=last_only, loss_only=loss_only)
        vectors = self.method.input_prompt()[None].expand(B, -1, -1) if P and not cache_pos else None
        placed = place_prompt(x, mask, targets, P, vectors, mask.new_ones(B, P), self.method.position_offset,
                              cache_pos)
        logits, loss = base(inputs_embeds=placed.x, targets=placed.targets, attention_mask=placed.mask,
                            position_ids=placed.positions, prefixes=prefixes["self"] if prefixes else None,
                            cache_pos=placed.cache_pos, last_only=last_only, loss_only=loss_only)
        return placed.without_prompt(logits, last_only), loss

    # ---- T5 ----------------------------------------------------------------------------

    def _encoder_side(self) -> bool:
        return self.n_prompt > 0 and self.method.config.placement == "encoder"

    def encoder_mask(self, attention_mask):
        """The encoder's mask once the soft prompt is in (no mask means no padding: stays None)."""
        if attention_mask is None or not self._encoder_side():
            return attention_mask
        return insert_at(attention_mask, attention_mask.new_ones(attention_mask.size(0), self.n_prompt),
                         leading_pads(attention_mask))

    def encode(self, input_ids, attention_mask=None):
        B, S = input_ids.shape
        x = self.base.embed(input_ids)                                        # (B, S, C)
        if self._encoder_side():
            at = (leading_pads(attention_mask) if attention_mask is not None
                  else torch.zeros(B, dtype=torch.long, device=input_ids.device))
            x = insert_at(x, self.method.input_prompt()[None].expand(B, -1, -1), at)
        prefixes = self.method.prefixes(B) or {}
        return self.base.encode(inputs_embeds=x, attention_mask=self.encoder_mask(attention_mask),
                                prefixes=prefixes.get("encoder"))

    def decode(self, decoder_input_ids, encoder_out, *, encoder_mask=None, cache_pos=None):
        """Like T5.decode; encoder_mask is the caller's (before the prompt went in)."""
        B, T = decoder_input_ids.shape
        x = self.base.embed(decoder_input_ids)                                # (B, T, C)
        P = self.n_prompt if self.method.config.placement == "decoder" else 0
        if P and not cache_pos:
            x = torch.cat([self.method.input_prompt()[None].expand(B, -1, -1).to(x.dtype), x], dim=1)
        elif P:
            cache_pos += P
        prefixes = self.method.prefixes(B) or {}
        logits = self.base.decode(None, encoder_out, decoder_inputs_embeds=x,
                                  encoder_mask=self.encoder_mask(encoder_mask),
                                  cache_pos=cache_pos, self_prefixes=prefixes.get("decoder"),
                                  cross_prefixes=prefixes.get("cross"))
        # (B, T, V): the prompt's columns dropped
        return logits[:, -T:]

    def _t5_forward(self, input_ids, decoder_input_ids, targets, attention_mask):
        if decoder_input_ids is None:
            if targets is None:
                raise ValueError("forward: give decoder_input_ids or targets")
            decoder_input_ids = self.base.shift_right(targets)
        logits = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                             encoder_mask=attention_mask)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                               ignore_index=-100)
        return logits, loss

    # ---- generation --------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens, **kwargs):
        """Same as `minipt.generation.generate`, with this model's prompt in place."""
        from ..generation import generate
        return generate(self, prompts, max_new_tokens, **kwargs)
