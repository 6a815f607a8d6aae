"""The one interface every method shares, and the config object that describes a method.

A method touches the frozen base model in at most two places (see `layers.py`):
  1. input embeddings: `input_prompt()` returns (P, C) vectors placed right before each
     row's real tokens (soft prompt, P-tuning);
  2. attention: `prefixes(batch_size)` returns per-layer `LayerPrefix`es (prefix tuning,
     P-tuning v2, LLaMA-Adapter).
LoRA and full fine-tuning instead change the base's own linear layers / weights, in
`attach`. Everything else (insertion after padding, masks, positions, the KV cache) is done
once, for all methods, by `PromptedModel` in `model.py`.
"""
import dataclasses
import importlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..layers import device_of

# The registry: method name -> "module in this package:class"; every class takes
# (config, base, tokenizer) and says what it is in its class attributes (see PromptMethod).
# Adding a method is one new file and one line here.
REGISTRY = {
    "prompt_tuning": "soft_prompt:SoftPrompt",
    "p_tuning": "p_tuning:PTuning",
    "prefix_tuning": "prefix:PrefixTuning",
    "p_tuning_v2": "prefix:PrefixTuning",
    "adapter": "adapter:PromptAdapter",
    "lora": "lora:LoRA",
    "full": "full:FullFineTuning",
}
METHODS = tuple(REGISTRY)

# peft's adapter types read back (interop's import): the method whose saved state each one
# holds. P-tuning's computed prompt is a soft prompt; a prefix comes as its table, the MLP's
# output, named after the method that trains it (prefix tuning with the MLP, v2 without).
FROM_PEFT = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "prompt_tuning", "LORA": "lora",
             "PREFIX_TUNING": "p_tuning_v2", "PREFIX_TUNING with projection": "prefix_tuning"}


def method_class(name: str) -> type:
    entry = REGISTRY[name]
    if isinstance(entry, type):      # a class registered at run time, from a script of your own
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), cls)


T5_SITES = ("encoder", "decoder", "cross")   # T5's three kinds of attention
AT_LEAST = {"num_virtual_tokens": 1, "encoder_hidden": 1, "projection_hidden": 1, "lora_r": 1, "seed": 0}
NOT_EMPTY = ("init_labels", "lora_targets")   # (no t5_prefix_sites is allowed: the base, unchanged)


@dataclass
class PromptConfig:
    method: str = "prompt_tuning"         # a name in REGISTRY (above): the methods, LoRA, full fine-tuning
    num_virtual_tokens: int = 20          # soft prompt / P-tuning / prefix length; adapter prompt length
    # soft prompt and P-tuning initialisation (Lester et al. 2021, §3.2)
    init: str = "vocab"                   # random (uniform ±0.5) | vocab | text | labels
    init_text: str = ""                   # for init="text"
    init_labels: list = field(default_factory=list)  # for init="labels": class-label strings
    placement: str = "encoder"            # T5 soft prompt: "encoder" input or "decoder" input
    # P-tuning v1 prompt encoder (Liu et al. 2021)
    encoder_type: str = "lstm"            # lstm (bidirectional LSTM + MLP) | mlp
    encoder_hidden: int = 256             # the prompt encoder's hidden size
    encoder_residual: bool = True         # prompt = embeddings + encoder output (last layer zero at start)
    # prefix tuning / P-tuning v2 (Li & Liang 2021; Liu et al. 2022)
    prefix_projection: "bool | None" = None   # MLP reparameterisation; None: on for prefix_tuning, off for v2
    projection_hidden: int = 512          # the MLP's hidden size (with prefix_projection)
    t5_prefix_sites: list = field(default_factory=lambda: list(T5_SITES))  # T5 attentions with prefixes
    # prompt adapter (LLaMA-Adapter, Zhang et al. 2023)
    adapter_layers: int = 8               # the top L layers get adaption prompts; -k: all but the lowest k
    # LoRA (Hu et al. 2021)
    lora_r: int = 8                       # rank of the update B A
    lora_alpha: float = 16.0              # the update is scaled by alpha / r
    lora_dropout: float = 0.0             # dropout on the update's input
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])  # linear layers by name
    seed: int = 0                         # initialisation seed

    def __post_init__(self):
        if self.method not in REGISTRY:
            raise ValueError(f"method={self.method!r}: unknown; choose one of {', '.join(METHODS)}")
        self._check_values()
        self._refuse_unused()

    def _check_values(self):
        """The fields the method reads, each in its range or among its choices."""
        cls, reads = method_class(self.method), fields_read(self.method, self.init)
        for key, allowed in cls.choices.items():
            value = getattr(self, key)
            items = value if isinstance(value, list) else [value]
            if key in reads and any(v not in allowed for v in items):
                raise ValueError(f"{key}={value!r}: {self.method} takes {' | '.join(allowed)}")
        for key in reads:
            value, low = getattr(self, key), AT_LEAST.get(key)
            if key in NOT_EMPTY and not value:
                raise ValueError(f"{key}=[]: {self.method} needs at least one")
            if low is not None and value < low:
                raise ValueError(f"{key}={value}: must be at least {low}")
        if "lora_alpha" in reads and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha}: must be above 0")
        if "lora_dropout" in reads and not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if "adapter_layers" in reads and self.adapter_layers == 0:
            raise ValueError("adapter_layers=0: give the top k layers (k > 0) or all but the lowest k (-k)")

    def _refuse_unused(self):
        """A field set away from its default that the method never reads is an error, not a
        silent no-op: the run would not be the one its config describes."""
        defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        reads = fields_read(self.method, self.init)
        for f in dataclasses.fields(PromptConfig):
            value = getattr(self, f.name)
            if f.name not in reads and value != defaults[f.name]:
                needs = {"init_text": "text", "init_labels": "labels"}.get(f.name)
                why = (f"it is read only with init={needs}"
                       if needs and f.name in fields_read(self.method, needs)
                       else f"{self.method} does not use it")
                raise ValueError(f"{f.name}={value!r}: {why}")

    def method_fields(self) -> dict:
        """The fields the method reads (with this init), as keyword arguments of PromptConfig."""
        reads = fields_read(self.method, self.init)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PromptConfig) if f.name in reads}

    @classmethod
    def for_method(cls, method: str, **fields) -> "PromptConfig":
        """A PromptConfig for `method` out of a superset of fields, keeping those it reads: one
        set of settings serves every method (a sweep, a test, a file from an older version)."""
        reads = fields_read(method, fields.get("init", PromptConfig.init))
        return PromptConfig(method=method, **{k: v for k, v in fields.items() if k in reads})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PromptConfig: unknown keys {', '.join(unknown)}")
        if d.get("method", PromptConfig.method) not in REGISTRY:
            return cls(**d)                               # refused in __post_init__, by name
        return cls.for_method(**d)


def drop_unread(settings: dict) -> dict:
    """train.py settings (a dict of TrainConfig keys) without the method fields their method
    does not read, which train.py would refuse: one set of settings serves every method. An
    unknown method keeps them all, to be refused by name."""
    method = settings.get("method", PromptConfig.method)
    if method not in REGISTRY:
        return dict(settings)
    method_keys = {f.name for f in dataclasses.fields(PromptConfig)}
    reads = fields_read(method, settings.get("init", "text"))
    return {k: v for k, v in settings.items() if k not in method_keys or k in reads}


def fields_read(method: str, init: str) -> set:
    """The PromptConfig fields `method` reads when initialised by `init`."""
    reads = {"method", "seed", *method_class(method).uses}
    if init != "text":
        reads.discard("init_text")
    if init != "labels":
        reads.discard("init_labels")
    return reads


class PromptMethod(nn.Module):
    """Base class; the defaults mean "this hook is not used"."""

    uses: tuple = ()       # the PromptConfig fields the method reads (besides method and seed)
    choices: dict = {}     # field -> the values it may take (each item's, for a list field)
    changes_base = False   # attaching changes the base's layers (LoRA) or weights (PromptBank: LoRA per row)
    trains_base = False    # the base's weights are the parameters (full fine-tuning): fp32, saved whole
    holds_soft_prompt = False  # the file's "prompt" tensor is (P, C) input vectors (inspect's neighbours)
    peft_type = None       # peft's name for the same method, if interop can export it

    @classmethod
    def recipe(cls, config: "PromptConfig") -> dict:
        """What train.py uses for the fields a run leaves unset (lr, warmup_steps, ...): the
        values this method was measured with (bench/results/methods/)."""
        return {}

    @classmethod
    def virtual_positions(cls, config: "PromptConfig") -> int:
        """Context positions a decoder gives the method before the text, known from the config
        (before any model loads); PromptedModel.extra_positions is the same, once attached."""
        return 0

    n_input_tokens = 0     # vectors that input_prompt() returns
    position_offset = 0    # positions the attention prefix occupies before the text

    def __init__(self, config: PromptConfig):
        super().__init__()
        self.config = config

    def attach(self, base: nn.Module) -> None:
        """Change the base model in place (LoRA, full fine-tuning); prompts leave it alone."""

    def input_prompt(self):
        """(P, C) vectors placed before the real tokens, or None."""
        return None

    def prefixes(self, batch_size: int):
        """{site: [LayerPrefix or None per layer]} with site "self" for the decoder-only model
        and "encoder" / "decoder" / "cross" for T5; or None."""
        return None

    def closed_form_parameters(self) -> int:
        """The trainable-parameter count from the method's formula (checked against the
        real count in the tests)."""
        raise NotImplementedError

    def describe_count(self) -> str:
        """The formula behind closed_form_parameters, for people."""
        return ""

    def state_for_saving(self) -> dict:
        """Tensors that make up the prompt file."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_saved(self, state: dict) -> None:
        self.load_state_dict(state, strict=True)


def model_dims(base) -> dict:
    """The sizes methods need, the same names for both families."""
    c = base.config
    if c.model_type == "t5":
        return dict(d_model=c.d_model, n_head=c.n_head, n_kv_head=c.n_head, head_dim=c.d_kv,
                    n_layers={"encoder": c.n_layer, "decoder": c.n_decoder_layer, "cross": c.n_decoder_layer})
    return dict(d_model=c.n_embd, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim,
                n_layers={"self": c.n_layer})


def attention_sites(base) -> dict:
    """{site: [attention module per layer]}: "self" for the decoder-only model; "encoder",
    "decoder" and "cross" for T5."""
    if base.config.model_type == "t5":
        return {"encoder": [b.attn for b in base.encoder.layers],
                "decoder": [b.attn for b in base.decoder.layers],
                "cross": [b.cross_attn for b in base.decoder.layers]}
    return {"self": [b.attn for b in base.layers]}


@torch.no_grad()
def text_activations(base, ids: list) -> dict:
    """{site: [(x, k, v) per layer]} when the frozen base reads the tokens `ids` alone:
    x (T, C) is what the layer's key/value projections read (the normed hidden states; for
    T5's cross-attention, the encoder's output), k and v (T, n_kv_head * head_dim) their
    outputs, before any rotation. T5 reads `ids` on both sides. Prompt methods start from
    these activations of real words (Li & Liang 2021, §7.3)."""
    sites = attention_sites(base)
    seen = {site: [None] * len(mods) for site, mods in sites.items()}
    hooks = []
    for site, mods in sites.items():
        for i, attn in enumerate(mods):
            def keep_k(_, args, out, site=site, i=i):
                seen[site][i] = (args[0][0].float(), out[0].float())
            def keep_v(_, args, out, site=site, i=i):
                seen[site][i] += (out[0].float(),)
            hooks += [attn.k_proj.register_forward_hook(keep_k), attn.v_proj.register_forward_hook(keep_v)]
    x = torch.tensor([ids], device=device_of(base))
    try:
        if base.config.model_type == "t5":
            base(x, decoder_input_ids=x)
        else:
            base(x, last_only=True)
    finally:
        for h in hooks:
            h.remove()
    return seen
