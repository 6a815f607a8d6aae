"""Prefix tuning (Li & Liang 2021, *Prefix-Tuning: Optimizing Continuous Prompts for
Generation*) and P-tuning v2 (Liu et al. 2022, *P-Tuning v2: Prompt Tuning Can Be Comparable
to Fine-tuning Universally Across Scales and Tasks*): P learned keys and values put in front
of every attention layer's own, so each query attends to them as to P earlier tokens.

The two papers differ in one switch, `prefix_projection` (on by default for
"prefix_tuning", off for "p_tuning_v2"). Li & Liang found the prefix unstable to optimise
directly, so they train it through a reparameterisation, an MLP over a small embedding;
P-tuning v2 trains the prefix itself. Either way a site has one table (P, L * 2 * kv),
kv = n_kv_head * head_dim:

    with the MLP:  embedding (P, d_model) -> Linear(d_model, hidden) -> tanh -> Linear(hidden, L*2*kv)
    without:       the table is the parameter

Its columns are ordered (layer, key/value, head, head_dim), the layout of peft's
PrefixEncoder output and of the prefix it saves, so a prefix moves between the two by
copying. One difference: for grouped-query models peft narrows the MLP's input embedding to
the kv width; here it stays d_model, as in Li & Liang.

Where the prefixes go:
  - decoder-only: site "self", every layer. The text's positions start after the prefix
    (`position_offset = P`), as in past-key-values implementations and peft.
  - T5: "encoder" (encoder self-attention), "decoder" (decoder self-attention) and "cross"
    (cross-attention), each with its own parameters, chosen by `t5_prefix_sites`. Prefix
    keys get no relative position bias and the text keeps its positions. (In transformers +
    peft the decoder's prefix sits in the cache, so its keys get the bias of the P positions
    before the first output token; peft also puts none in the encoder.) A prefix is not text
    at any distance, so here it is attended by content alone.

Initialisation (`init`): "text" and "vocab" start every layer's prefix at the keys and
values the frozen base computes for real words (Li & Liang 2021, §7.3: activations of real
words matter most with little data), the text's tokens or P sampled common ones. On the
decoder-only model they are exactly what the KV cache holds after the base reads those P
tokens at positions 0..P-1 (keys rotated there), so at step 0 the prompted model computes
what the base computes with the tokens as a hard prompt in front of the input. T5's prefix
keys carry no position bias, so there the same activations are a close start, not an exact
one. With the MLP the table starts as that fixed `anchor` plus the MLP's output, whose last
layer starts at zero; "random" is the papers' ablation: N(0, 1) table or embedding, no anchor.

Nothing is precomputed: the MLP runs in every forward (it is tiny next to the model), so the
prefix never goes stale during training, and the saved file holds the embedding and the MLP
so training can resume.
"""
import math

import torch
import torch.nn as nn

from ..layers import LayerPrefix, device_of
from .base import T5_SITES, PromptConfig, PromptMethod, model_dims, text_activations
from .soft_prompt import initial_token_ids


def _linear(d_in: int, d_out: int, g: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default init, U(±1/sqrt(d_in)), drawn from a seeded generator."""
    lin = nn.Linear(d_in, d_out)
    bound = 1 / math.sqrt(d_in)
    with torch.no_grad():
        for p in (lin.weight, lin.bias):
            p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
    return lin


class PrefixTable(nn.Module):
    """The prefixes of one site: every layer's P keys and values as one (P, L*2*kv) table,
    starting at `start` (P, L*2*kv) when given, else N(0, 1)."""

    def __init__(self, P: int, n_layers: int, kv: int, d_model: int, projection: bool, hidden: int,
                 g: torch.Generator, start: "torch.Tensor | None" = None):
        super().__init__()
        width = n_layers * 2 * kv
        self.projection = projection
        if projection:
            self.embedding = nn.Parameter(torch.randn(P, d_model, generator=g))   # (P, C)
            self.mlp_in = _linear(d_model, hidden, g)
            self.mlp_out = _linear(hidden, width, g)
            # fixed, saved with the prompt; the MLP learns the change from it
            self.register_buffer("anchor", torch.zeros(P, width) if start is None else start.clone())
            if start is not None:
                nn.init.zeros_(self.mlp_out.weight)
                nn.init.zeros_(self.mlp_out.bias)
        else:
            self.table = nn.Parameter(torch.randn(P, width, generator=g) if start is None else start.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.projection:  # files from before the anchor start from none
            state_dict.setdefault(prefix + "anchor", torch.zeros_like(self.anchor))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self):
        if self.projection:
            return self.anchor + self.mlp_out(torch.tanh(self.mlp_in(self.embedding)))   # (P, L*2*kv)
        return self.table


@torch.no_grad()
def activation_tables(base, ids: list, sites) -> dict:
    """{site: (P, L*2*kv)} the keys and values the frozen base computes for the tokens `ids`,
    in the table's column order (layer, key/value, head, head_dim)."""
    P = len(ids)
    if base.config.model_type != "t5":
        base.setup_cache(1, P)
        try:
            base(torch.tensor([ids], device=device_of(base)), cache_pos=0, last_only=True)
            kv = torch.stack([torch.stack([b.attn.cache.k[0], b.attn.cache.v[0]]) for b in base.layers])
        finally:
            base.clear_cache()
        # (L, 2, nkv, P, hs) -> (P, L*2*kv)
        return {"self": kv.float().permute(3, 0, 1, 2, 4).reshape(P, -1)}
    seen = text_activations(base, ids)
    return {s: torch.stack([torch.stack([k, v], 1) for _, k, v in seen[s]], 1).reshape(P, -1) for s in sites}


class PrefixTuning(PromptMethod):
    uses = ("num_virtual_tokens", "init", "init_text", "prefix_projection", "projection_hidden",
            "t5_prefix_sites")
    choices = {"init": ("text", "vocab", "random"), "t5_prefix_sites": T5_SITES}
    peft_type = "PREFIX_TUNING"            # P-tuning v2 too: peft's prefix tuning without the MLP

    @classmethod
    def recipe(cls, config):
        # Through the MLP a step moves the prefix ~hidden x lr, so it takes a smaller lr (Li &
        # Liang: 5e-5 over many epochs); the table, Liu et al. 2022's 5e-3 to 1e-2. Measured as
        # SoftPrompt's: MLP 86.3 % / 95.4 %, table 86.5 % / 93.3 % (sentiment / topic)
        return dict(lr=5e-4 if cls.projected(config) else 1e-2, warmup_steps=10)

    @staticmethod
    def projected(config) -> bool:
        """The MLP reparameterisation: on for prefix tuning, off for P-tuning v2, unless set."""
        if config.prefix_projection is not None:
            return config.prefix_projection
        return config.method == "prefix_tuning"

    @classmethod
    def virtual_positions(cls, config):
        return config.num_virtual_tokens

    def __init__(self, config: PromptConfig, base, tokenizer=None):
        super().__init__(config)
        dims = model_dims(base)
        self.is_t5 = base.config.model_type == "t5"
        self.projection = self.projected(config)
        if self.is_t5:
            unknown = sorted(set(config.t5_prefix_sites) - set(T5_SITES))
            if unknown:
                raise ValueError(f"t5_prefix_sites: unknown {', '.join(unknown)}; "
                                 f"choose from {', '.join(T5_SITES)}")
            sites = [s for s in T5_SITES if s in config.t5_prefix_sites]
        else:
            sites = ["self"]
        self.P = config.num_virtual_tokens
        self.position_offset = 0 if self.is_t5 else self.P
        self.n_kv_head, self.head_dim, self.d_model = dims["n_kv_head"], dims["head_dim"], dims["d_model"]
        self.n_layers = {s: dims["n_layers"][s] for s in sites}
        if config.init in ("text", "vocab"):
            ids = initial_token_ids(config, tokenizer, base.config.vocab_size, self.P)
            starts = activation_tables(base, ids, sites)
        elif config.init == "random":
            starts = {}
        else:
            raise ValueError(f"{config.method}: init {config.init!r} unknown; choose text, vocab or random")
        g = torch.Generator().manual_seed(config.seed)
        self.sites = nn.ModuleDict({
            s: PrefixTable(self.P, self.n_layers[s], self.n_kv_head * self.head_dim, self.d_model,
                           self.projection, config.projection_hidden, g, starts.get(s))
            for s in sites})

    def prefixes(self, batch_size: int):
        out = {}
        for site, table in self.sites.items():
            L = self.n_layers[site]
            kv = table().view(self.P, L, 2, self.n_kv_head, self.head_dim)    # (P, L, 2, nkv, hs)
            kv = kv.permute(1, 2, 3, 0, 4)                                    # (L, 2, nkv, P, hs)
            shape = (batch_size, self.n_kv_head, self.P, self.head_dim)      # the same prefix for every row
            out[site] = [LayerPrefix(kv[i, 0].expand(shape), kv[i, 1].expand(shape)) for i in range(L)]
        return out

    def closed_form_parameters(self) -> int:
        kv = self.n_kv_head * self.head_dim
        H = self.config.projection_hidden
        total = 0
        for L in self.n_layers.values():
            width = L * 2 * kv
            if self.projection:
                total += self.P * self.d_model + (self.d_model * H + H) + (H * width + width)
            else:
                total += self.P * width
        return total

    def describe_count(self) -> str:
        """Per site: P x L x 2 x (n_kv_head x head_dim), or with the MLP
        P x d_model + (d_model x hidden + hidden) + (hidden x L*2*kv + L*2*kv)."""
        parts = []
        for site, L in self.n_layers.items():
            width = f"{L} layers x 2 x ({self.n_kv_head} kv heads x head_dim {self.head_dim})"
            if self.projection:
                C, H, W = self.d_model, self.config.projection_hidden, L * 2 * self.n_kv_head * self.head_dim
                parts.append(f"{site}: embedding {self.P} x {C} + MLP ({C} x {H} + {H}) + ({H} x {W} + {W}), "
                             f"{W} = {width}")
            else:
                parts.append(f"{site}: {self.P} tokens x {width}")
        return "; ".join(parts) or "no prefix sites"
