"""Many prompts on one frozen decoder, mixed in one batch.

    bank = PromptBank(base)
    bank.add("sentiment", "out/sentiment/prompt.safetensors", tok)
    bank.add("style", "style.safetensors", tok)
    bank.add("sql", "out/sql-lora/prompt.safetensors", tok)          # a LoRA
    logits, _ = bank(idx, rows=["sentiment", None, "style+sentiment", "sql+style"], attention_mask=mask)
    generate(bank.for_rows(["sentiment", "style", "sql"]), token_lists, 32)

Every row names its own prompt: None (or "") is the bare base, "a+b" composes a and b.
A prompt contributes up to four pieces, none of which depends on the input, so each is
computed once when the prompt is added:

  vectors   (P, C) virtual tokens before the text (soft prompt, P-tuning);
  joined    per layer, keys/values in the same softmax as the text's (prefix tuning,
            P-tuning v2), plus the P positions they occupy before the text;
  gated     per layer, keys/values with their own softmax and tanh gate (prompt adapter);
  lora      per targeted linear layer, a LoRA's A, B and scale, applied to the row's own
            tokens only, never merged into the shared base (`lora_rows.py`, S-LoRA / Punica).

A batch pads each piece to its longest row and masks the padding out: a row's virtual
tokens sit right before its first real token, as in `PromptedModel`, with masked slots
in front of them; positions count real tokens only. So every row computes exactly what it
would alone (`tests/test_mixed.py` checks each pair of methods). Composition concatenates
the pieces in order: "a+b" reads a's virtual tokens then b's, and a's prefix then b's. A row
takes at most one LoRA; its layers then read the other prompts' virtual tokens as well as
the text ("sql+style" is the style prompt on the LoRA'd model).

Full fine-tuning replaces every weight of the base, so it cannot share a batch with other
prompts and is refused here: serve it as its own base (`minipt.prompts.load`).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import LayerPrefix
from .base import METHODS, PromptConfig, method_class
from .lora import LoRA
from .lora_rows import ActiveRows, LoRAWeights, RowLoRALinear, stack_rows
from .model import place_prompt, whole_mask

# the methods that leave the base alone, and LoRA (applied per row, unmerged)
MIXABLE = tuple(m for m in METHODS if not method_class(m).changes_base or issubclass(method_class(m), LoRA))


@dataclass
class Pieces:
    """What one prompt adds to a forward pass (see the module docstring)."""
    vectors: "torch.Tensor | None"                  # (P, C)
    joined: "list[tuple | None]"                    # per layer: (k, v), each (n_kv_head, P, hs)
    gated: "list[list[tuple]]"                      # per layer: [(k, v, gate (n_head,)), ...]
    position_offset: int                            # positions the joined prefix occupies
    lora: "LoRAWeights | None" = None               # per layer path: (A (r, in), B (out, r), scale)

    @staticmethod
    def of(method, n_layers: int) -> "Pieces":
        prefixes = (method.prefixes(1) or {}).get("self", [None] * n_layers)
        vectors = method.input_prompt()
        joined = [None if p is None or p.gate is not None else (p.k[0], p.v[0]) for p in prefixes]
        gated = [[] if p is None or p.gate is None else [(p.k[0], p.v[0], p.gate)] for p in prefixes]
        return Pieces(vectors, joined, gated, method.position_offset)

    @staticmethod
    def of_lora(weights: LoRAWeights, n_layers: int) -> "Pieces":
        return Pieces(None, [None] * n_layers, [[] for _ in range(n_layers)], 0, weights)

    @staticmethod
    def compose(parts: "list[Pieces]", n_layers: int) -> "Pieces":
        """a+b+...: vectors and joined prefixes concatenated in order, gated ones side by side,
        and the one LoRA among them, if any."""
        loras = [p.lora for p in parts if p.lora is not None]
        if len(loras) > 1:
            raise ValueError(f"a row takes one LoRA: this composition holds {len(loras)} "
                             "(compose a LoRA with prompts, not with another LoRA)")
        vectors = [p.vectors for p in parts if p.vectors is not None]
        joined = []
        for i in range(n_layers):
            kv = [p.joined[i] for p in parts if p.joined[i] is not None]
            joined.append((torch.cat([k for k, _ in kv], 1), torch.cat([v for _, v in kv], 1))
                          if kv else None)
        gated = [sum((p.gated[i] for p in parts), []) for i in range(n_layers)]
        return Pieces(torch.cat(vectors) if vectors else None, joined, gated,
                      sum(p.position_offset for p in parts), loras[0] if loras else None)


class PromptBank(nn.Module):
    """A frozen decoder and any number of named prompts, servable together."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if base.config.model_type != "gpt":
            raise ValueError("PromptBank: mixed-prompt batches are for decoder-only models")
        base.requires_grad_(False)
        self.base = base
        self.n_layers = len(base.layers)
        self.pieces: dict[str, Pieces] = {}
        self.row_lora: dict[str, RowLoRALinear] = {}    # layer path -> its wrapper, once a LoRA targets it
        self.fingerprints: dict = {}                    # id(tokenizer) -> (tokenizer, the base's fingerprint)

    @property
    def config(self):
        return self.base.config

    @property
    def names(self) -> list[str]:
        return sorted(self.pieces)

    def add(self, name: str, prompt, tokenizer=None) -> None:
        """Register a prompt under `name`: a prompt file, or a PromptedModel on this base (a
        LoRA one on another copy of it: attached to this base, it would change every row)."""
        from . import load, read_prompt
        if "+" in name or not name:
            raise ValueError(f"PromptBank.add: {name!r} is not a usable name ('+' composes prompts)")
        source = f"PromptBank.add({name!r})" if isinstance(prompt, nn.Module) else prompt
        if isinstance(prompt, nn.Module):
            kind, file = prompt.method.config.method, None
        else:
            file = read_prompt(prompt)
            kind = file[0]["config"]["method"]
        if kind in METHODS and kind not in MIXABLE:
            why = ("replaces every weight of the base, so it can only be served as its own base "
                   "(minipt.prompts.load)" if method_class(kind).trains_base
                   else "changes the base's own layers and cannot share a batch with other prompts")
            raise ValueError(f"{source}: {kind} {why}; mixable: {', '.join(MIXABLE)}")
        if kind in METHODS and issubclass(method_class(kind), LoRA):
            # never load()ed: attaching its LoRALinear wrappers would change the shared base
            weights = self._lora_weights(prompt, file, source, tokenizer)
            for path in weights.layers:
                self._wrap(path)
            self.pieces[name] = Pieces.of_lora(weights, self.n_layers)
            return
        method = (prompt if isinstance(prompt, nn.Module)
                  else load(prompt, self.base, tokenizer, self._fingerprint(tokenizer))).method
        with torch.no_grad():
            method.eval()
            p = Pieces.of(method, self.n_layers)
        dtype = self.base.embed.weight.dtype
        self.pieces[name] = Pieces(None if p.vectors is None else p.vectors.to(dtype),
                                   [None if j is None else (j[0].to(dtype), j[1].to(dtype))
                                    for j in p.joined],
                                   [[(k.to(dtype), v.to(dtype), g.float()) for k, v, g in layer]
                                    for layer in p.gated],
                                   p.position_offset)

    def _lora_weights(self, prompt, file, source, tokenizer) -> LoRAWeights:
        from .files import base_fingerprint, check_fingerprint
        if file is None:
            if prompt.base is self.base:
                raise ValueError(f"{source}: this LoRA is attached to the bank's own base, which it changes "
                                 "for every row; attach it to another copy of the base, or add its file")
            check_fingerprint(source, {"base": base_fingerprint(prompt.base)}, base_fingerprint(self.base))
            config, state = prompt.method.config, prompt.method.state_for_saving()
        else:
            meta, state = file
            check_fingerprint(prompt, meta, self._fingerprint(tokenizer))
            config = PromptConfig.from_dict(meta["config"])
        return LoRAWeights.from_state(state, config.lora_alpha / config.lora_r, self.base, source)

    def _fingerprint(self, tokenizer) -> dict:
        """The frozen base's fingerprint with this tokenizer, hashed once (0.3 s on SmolLM2),
        not for every file added."""
        from .files import base_fingerprint
        kept = self.fingerprints.get(id(tokenizer))
        if kept is None:   # the tokenizer is kept with it, so its id is not reused
            kept = self.fingerprints[id(tokenizer)] = (tokenizer, base_fingerprint(self.base, tokenizer))
        return kept[1]

    def _wrap(self, path: str) -> None:
        """Swap the base's linear layer at `path` for a RowLoRALinear (once)."""
        if path not in self.row_lora:
            owner, _, attr = path.rpartition(".")
            owner = self.base.get_submodule(owner)
            layer = getattr(owner, attr)
            if not isinstance(layer, RowLoRALinear):   # (another bank on this base may have wrapped it)
                layer = RowLoRALinear(layer)
                setattr(owner, attr, layer)
            self.row_lora[path] = layer

    def remove(self, name: str) -> None:
        self.pieces.pop(name)

    def resolve(self, spec) -> "Pieces | None":
        """A row's prompt: None / "" (no prompt), "name" or "a+b+..." (composed), or Pieces
        already resolved (a server's running row keeps its prompt if the file goes)."""
        if not spec or isinstance(spec, Pieces):
            return spec or None
        parts = []
        for name in spec.split("+"):
            if name not in self.pieces:
                raise KeyError(f"unknown prompt {name!r} (loaded: {', '.join(self.names) or 'none'})")
            parts.append(self.pieces[name])
        return parts[0] if len(parts) == 1 else Pieces.compose(parts, self.n_layers)

    # ---- one batch, a prompt per row ---------------------------------------------------------

    def batch_layout(self, rows) -> dict:
        """The padded, masked tensors of the rows' pieces (the same for every call with these rows)."""
        resolved = [self.resolve(r) for r in rows]
        B, C, device = len(rows), self.base.config.n_embd, self.base.embed.weight.device
        dtype = self.base.embed.weight.dtype
        lengths = [0 if p is None or p.vectors is None else len(p.vectors) for p in resolved]
        P = max(lengths)
        vectors = torch.zeros(B, P, C, dtype=dtype, device=device)
        vmask = torch.zeros(B, P, dtype=torch.long, device=device)
        for b, (p, n) in enumerate(zip(resolved, lengths)):
            # right-aligned: masked slots come first
            if n:
                vectors[b, P - n:], vmask[b, P - n:] = p.vectors, 1
        offsets = torch.tensor([0 if p is None else p.position_offset for p in resolved], device=device)
        prefixes = [self._layer_prefixes(resolved, i) for i in range(self.n_layers)]
        return {"P": P, "vectors": vectors, "vmask": vmask, "offsets": offsets,
                "prefixes": prefixes if any(prefixes) else None,
                "lora": stack_rows([None if p is None else p.lora for p in resolved], device),
                "extra_positions": max(n + int(o) for n, o in zip(lengths, offsets))}

    def _layer_prefixes(self, resolved, i):
        """Layer i's LayerPrefix list for the batch: one joined (masked to each row's length)
        and one gated per adapter slot (rows without one get a zero gate)."""
        out = []
        joined = [None if p is None else p.joined[i] for p in resolved]
        if any(j is not None for j in joined):
            out.append(self._stack(joined, gate=False))
        n_slots = max(0 if p is None else len(p.gated[i]) for p in resolved)
        for s in range(n_slots):
            out.append(self._stack([None if p is None or len(p.gated[i]) <= s else p.gated[i][s]
                                    for p in resolved], gate=True))
        return out

    def _stack(self, items, gate: bool) -> LayerPrefix:
        ref = next(x for x in items if x is not None)
        nkv, _, hs = ref[0].shape
        B, P = len(items), max(x[0].size(1) for x in items if x is not None)
        k = ref[0].new_zeros(B, nkv, P, hs)
        v = torch.zeros_like(k)
        # a row without this piece: no slot is kept in a joined prefix; in a gated one all are
        # (zero keys and values, gate 0: adds exactly zero, where an empty softmax would be NaN)
        mask = torch.full((B, P), gate, dtype=torch.bool, device=k.device)
        gates = torch.zeros(B, self.base.config.n_head, device=k.device) if gate else None
        for b, x in enumerate(items):
            if x is None:
                continue
            n = x[0].size(1)
            k[b, :, :n], v[b, :, :n] = x[0], x[1]
            mask[b] = False
            mask[b, :n] = True
            if gate:
                gates[b] = x[2]
        return LayerPrefix(k, v, mask=mask, gate=gates)

    @contextmanager
    def lora_rows(self, layout: dict, token_slots=None):
        """For the duration, each row of the batch gets its own LoRA's update on the layers it
        targets (layout from batch_layout: a decoding step of the base with these rows runs
        inside). token_slots (N,): each token's slot where the base packs the batch
        (GPT.forward without a cache, fast on: `fast.Unpadded`'s tokens, row-major).
        Nothing is activated for a layout without LoRA rows."""
        lora = layout["lora"]
        if lora is None:
            yield
            return
        groups = n_tokens = None
        if token_slots is not None:
            k = next(iter(lora["layers"].values()))[0].size(0) - 1
            groups = [(token_slots == s).nonzero().squeeze(1) for s in range(1, k + 1)]
            n_tokens = len(token_slots)
        wrappers = {path: self.row_lora[path] for path in lora["layers"]}
        before = {path: w.rows for path, w in wrappers.items()}
        try:
            for path, (A, B, scale) in lora["layers"].items():
                wrappers[path].rows = ActiveRows(A, B, scale, lora["slots"], groups, n_tokens)
            yield
        finally:
            for path, w in wrappers.items():
                w.rows = before[path]

    def forward(self, idx, targets=None, *, rows, attention_mask=None, cache_pos=None, last_only=False,
                loss_only=False, layout=None):
        """Like PromptedModel.forward, with rows[b] naming row b's prompt. Pass `layout`
        (from batch_layout) to reuse it across the calls of one generation."""
        layout = layout or self.batch_layout(rows)
        x = self.base.embed(idx)
        mask = whole_mask(attention_mask, idx, cache_pos)
        placed = place_prompt(x, mask, targets, layout["P"], layout["vectors"], layout["vmask"],
                              layout["offsets"][:, None], cache_pos)
        token_slots = None
        if layout["lora"] is not None and placed.cache_pos is None:
            token_slots = layout["lora"]["slots"][:, None].expand_as(placed.mask)[placed.mask.bool()]   # (N,)
        with self.lora_rows(layout, token_slots):
            logits, loss = self.base(inputs_embeds=placed.x, targets=placed.targets,
                                     attention_mask=placed.mask, position_ids=placed.positions,
                                     prefixes=layout["prefixes"], cache_pos=placed.cache_pos,
                                     last_only=last_only, loss_only=loss_only)
        return placed.without_prompt(logits, last_only), loss

    def for_rows(self, rows) -> "BoundRows":
        """This bank with fixed prompts: a list (one spec per row) or one spec for every row
        of any batch. The result is a model `generate` and `rank_classify` can drive."""
        return BoundRows(self, rows)


class BoundRows(nn.Module):
    """A PromptBank whose rows' prompts are fixed (what generation needs)."""
    n_members = 1                          # (minipt.protocol.DecodingModel)

    def __init__(self, bank: PromptBank, rows):
        super().__init__()
        self.bank, self.rows = bank, rows if isinstance(rows, str) or rows is None else list(rows)
        self._layouts = {}

    def layout(self, batch_size: int) -> dict:
        if isinstance(self.rows, list) and batch_size != len(self.rows):
            raise ValueError(f"for_rows: {len(self.rows)} rows bound, batch of {batch_size}")
        if batch_size not in self._layouts:
            rows = self.rows if isinstance(self.rows, list) else [self.rows] * batch_size
            self._layouts[batch_size] = self.bank.batch_layout(rows)
        return self._layouts[batch_size]

    @property
    def config(self):
        return self.bank.config

    @property
    def extra_positions(self) -> int:
        return self.layout(len(self.rows) if isinstance(self.rows, list) else 1)["extra_positions"]

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        self.bank.base.setup_cache(batch_size, max_len + self.layout(batch_size)["P"], dtype, device)

    def clear_cache(self):
        self.bank.base.clear_cache()

    def forward(self, idx, targets=None, **kwargs):
        layout = self.layout(idx.size(0))
        return self.bank(idx, targets, rows=None, layout=layout, **kwargs)
