"""LoRA (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*), a baseline
for the prompt methods: a frozen linear layer W gets a trainable low-rank update,

    y = W x + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r),

with A random and B zero, so training starts from the base model's exact output.

`attach` swaps each targeted `nn.Linear` (by attribute name: q_proj, v_proj, ...) for a
`LoRALinear` that keeps the original layer as `.base`, untouched. The A and B matrices live
inside the base model, where the forward needs them, and are also registered on the method,
so the method's parameters (what is trained and what is saved) are exactly the A/B pairs.

Trainable parameters = sum over targeted layers of r x (in + out).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fast
from ..layers import device_of
from ..quantized import QuantizedLinear
from .base import PromptConfig, PromptMethod


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or quantized.QuantizedLinear) plus its low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, generator=None):
        super().__init__()
        self.base = base
        # peft's default init: A like nn.Linear's own weights (Kaiming-uniform, a=sqrt(5)), B zero.
        # fp32 even on a bf16 base; drawn on the CPU so a seed gives the same A on any device
        A = nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(device_of(base)))                  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device_of(base)))  # (out, r)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self):
        """The update as a full matrix (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):                                                       # (..., in)
        y = self.base(x)                                                        # (..., out)
        if self.merged:
            return y
        if fast.ENABLED and not (self.dropout.p and self.training):
            return y + fast.LowRankUpdate.apply(x, self.lora_A, self.lora_B, self.scale).to(y.dtype)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)       # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


# the frozen layers LoRA wraps: dense, or kept in quantized codes (train.py --base_quant)
LINEAR = (nn.Linear, QuantizedLinear)


def find_targets(base: nn.Module, names) -> list:
    """[(dotted path, layer)] for every linear layer whose attribute name is in `names`."""
    found = [(path, m) for path, m in base.named_modules()
             if isinstance(m, LINEAR) and path.rpartition(".")[2] in names]
    missing = sorted(set(names) - {path.rpartition(".")[2] for path, _ in found})
    if missing:
        if any(isinstance(m, LoRALinear) for m in base.modules()):
            raise ValueError("LoRA: this base model already has LoRA layers; attach to a fresh copy")
        available = sorted({p.rpartition(".")[2] for p, m in base.named_modules() if isinstance(m, LINEAR)})
        raise ValueError(f"lora_targets: no linear layer named {', '.join(missing)}; "
                         f"this model has {', '.join(available)}")
    return found


def _key(path: str) -> str:
    return path.replace(".", "__")  # parameter names may not contain dots


class LoRA(PromptMethod):
    uses = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
    changes_base = True
    peft_type = "LORA"

    @classmethod
    def recipe(cls, config):
        return dict(lr=2e-3, warmup_steps=10)   # the usual range, scaled up for a few hundred steps

    def __init__(self, config: PromptConfig, base, tokenizer=None):
        super().__init__(config)
        if config.lora_r <= 0:
            raise ValueError(f"LoRA: lora_r must be > 0, got {config.lora_r}")
        g = torch.Generator().manual_seed(config.seed)
        # dotted path in the base -> wrapper; a plain dict, since each wrapper holds a base layer
        # that must not become part of the method's state
        self.wrappers = {path: LoRALinear(linear, config.lora_r, config.lora_alpha, config.lora_dropout, g)
                         for path, linear in find_targets(base, config.lora_targets)}
        # the same Parameter objects as in the wrappers: the method's parameters are the A/B pairs
        self.lora_A = nn.ParameterDict({_key(p): w.lora_A for p, w in self.wrappers.items()})
        self.lora_B = nn.ParameterDict({_key(p): w.lora_B for p, w in self.wrappers.items()})

    def attach(self, base):
        for path, wrapper in self.wrappers.items():
            owner, _, name = path.rpartition(".")
            owner = base.get_submodule(owner)
            if getattr(owner, name) is not wrapper.base:
                raise ValueError(f"LoRA: {path} is not the layer this method was built for")
            setattr(owner, name, wrapper)

    def detach(self, base):
        """Put the plain linear layers back (merged or not): the base's own state-dict keys
        again, e.g. to export a merged model."""
        for path, wrapper in self.wrappers.items():
            owner, _, name = path.rpartition(".")
            setattr(base.get_submodule(owner), name, wrapper.base)

    def merge(self):
        """Fold scale * B A into the base weights, so inference costs nothing extra. This
        changes the base: `unmerge` takes it out again (exactly in fp32 up to rounding)."""
        for w in self.wrappers.values():
            w.merge()

    def unmerge(self):
        for w in self.wrappers.values():
            w.unmerge()

    def closed_form_parameters(self) -> int:
        return sum(w.lora_A.size(0) * (w.base.in_features + w.base.out_features)
                   for w in self.wrappers.values())

    def describe_count(self) -> str:
        return (f"r {self.config.lora_r} x (in + out), summed over {len(self.wrappers)} layers "
                f"({', '.join(self.config.lora_targets)})")

    def state_for_saving(self) -> dict:
        """{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)}: no base weight."""
        state = {}
        for path, w in self.wrappers.items():
            state[f"{path}.lora_A"] = w.lora_A.detach().contiguous()
            state[f"{path}.lora_B"] = w.lora_B.detach().contiguous()
        return state

    def load_saved(self, state: dict) -> None:
        if any(w.merged for w in self.wrappers.values()):
            raise ValueError("LoRA: unmerge before loading other weights")
        ours = {}
        for k, v in state.items():
            path, _, which = k.rpartition(".")
            ours[f"{which}.{_key(path)}"] = v
        self.load_state_dict(ours, strict=True)
