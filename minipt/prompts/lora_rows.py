"""Many LoRA adapters on one frozen base, a different one for each row of a batch, as
S-LoRA (Sheng et al. 2023, *S-LoRA: Serving Thousands of Concurrent LoRA Adapters*) and
Punica (Chen et al. 2023, *Punica: Multi-Tenant LoRA Serving*) serve them, in plain PyTorch.

Merging B A into a weight (`LoRALinear.merge`) serves one adapter at a time. Here nothing
is merged: each targeted linear layer of the base is wrapped once (`RowLoRALinear`), computes
the base's own product for the whole batch, and adds each row's low-rank update

    y_i = W x_i + scale_i * B_i A_i x_i,

where row i's (A_i, B_i, scale_i) are gathered from a stack of the batch's distinct
adapters (`stack_rows`): slot 0 is all zeros (rows without a LoRA), smaller ranks are
zero-padded to the largest (exact: the padding adds zeros). Two kernels:

  gathered   (B, T, in) inputs: one batched matmul with A[slots], B[slots] (Punica's BGMV);
  segmented  packed (N, in) tokens (`fast.Unpadded`): one matmul pair per distinct adapter
             over its own tokens, added back in place (Punica's SGMV).

The update runs only while a batch with LoRA rows is active (`PromptBank.lora_rows`);
otherwise a wrapper returns exactly its base layer's output.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(eq=False)   # compared by identity: a batch stacks each distinct adapter once
class LoRAWeights:
    """One LoRA, kept apart from the base: per targeted layer path, (A (r, in), B (out, r),
    scale), A and B in fp32 on the base's device (as LoRALinear keeps them)."""
    layers: dict

    @classmethod
    def from_state(cls, state: dict, scale: float, base: nn.Module, source) -> "LoRAWeights":
        """A LoRA file's tensors, {"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)},
        checked against the base's linear layers."""
        device = base.embed.weight.device
        layers = {}
        for path in dict.fromkeys(key.rpartition(".")[0] for key in state):
            A, B = state.get(f"{path}.lora_A"), state.get(f"{path}.lora_B")
            layer = _linear_at(base, path)
            if (A is None or B is None or layer is None or A.dim() != 2 or A.size(1) != layer.in_features
                    or tuple(B.shape) != (layer.out_features, A.size(0))):
                raise ValueError(f"{source}: the LoRA tensors for {path} fit no linear layer of this base")
            layers[path] = (A.to(device, torch.float32), B.to(device, torch.float32), scale)
        return cls(layers)


def _linear_at(base, path):
    try:
        layer = base.get_submodule(path)
    except AttributeError:
        return None
    layer = layer.base if isinstance(layer, RowLoRALinear) else layer
    return layer if isinstance(layer, nn.Linear) else None


def stack_rows(adapters: list, device) -> "dict | None":
    """The rows' adapters (LoRAWeights or None each) as what the wrappers read: None if no
    row has one, else {"slots": (B,) long, each row's slot; "layers": {path: (A (k+1, r, in),
    B (k+1, out, r), scale (k+1,))}} over the k distinct adapters, slot 0 all zeros."""
    distinct = []
    for a in adapters:
        if a is not None and all(a is not d for d in distinct):
            distinct.append(a)
    if not distinct:
        return None
    slot = {id(a): s for s, a in enumerate(distinct, 1)}
    slots = torch.tensor([0 if a is None else slot[id(a)] for a in adapters], device=device)
    k, layers = len(distinct), {}
    for path in dict.fromkeys(p for a in distinct for p in a.layers):
        have = [(s, a.layers[path]) for s, a in enumerate(distinct, 1) if path in a.layers]
        A0, B0, _ = have[0][1]
        r = max(A.size(0) for _, (A, _, _) in have)
        A = A0.new_zeros(k + 1, r, A0.size(1))                           # (k+1, r, in)
        B = B0.new_zeros(k + 1, B0.size(0), r)                           # (k+1, out, r)
        scale = A0.new_zeros(k + 1)                                      # (k+1,)
        for s, (a, b, c) in have:
            A[s, :a.size(0)], B[s, :, :a.size(0)], scale[s] = a, b, c
        layers[path] = (A, B, scale)
    return {"slots": slots, "layers": layers}


def gathered(x, A, B, scale, slots):
    """Row b of x (B, T, in) through adapter slots[b]: (B, T, out) in A's dtype (BGMV)."""
    h = torch.bmm(x.to(A.dtype), A[slots].transpose(1, 2))                # (B, T, r)
    return torch.bmm(h, B[slots].transpose(1, 2)) * scale[slots][:, None, None]


def segmented(x, A, B, scale, groups):
    """Packed tokens x (N, in), groups[s - 1] the indices of adapter s's tokens: (N, out) in
    A's dtype, zero for the tokens of slot 0 (SGMV)."""
    out = x.new_zeros(x.size(0), B.size(1), dtype=A.dtype)                # (N, out)
    for s, index in enumerate(groups, 1):
        h = F.linear(x[index].to(A.dtype), A[s])                          # (n_s, r)
        out.index_add_(0, index, F.linear(h, B[s]) * scale[s])
    return out


@dataclass
class ActiveRows:
    """One layer's adapters for the batch now running (set by PromptBank.lora_rows)."""
    A: torch.Tensor                  # (k+1, r, in)
    B: torch.Tensor                  # (k+1, out, r)
    scale: torch.Tensor              # (k+1,)
    slots: torch.Tensor              # (B,) each row's slot
    groups: "list | None"            # packed inputs: each adapter's token indices, slots 1..k
    n_tokens: "int | None"           # packed inputs: how many tokens (token_slots' length)

    def update(self, x):
        if x.dim() == 3 and x.size(0) == len(self.slots):
            return gathered(x, self.A, self.B, self.scale, self.slots)
        if x.dim() == 2 and x.size(0) == self.n_tokens:
            return segmented(x, self.A, self.B, self.scale, self.groups)
        raise ValueError(f"LoRA rows: an input of shape {tuple(x.shape)} fits neither the batch's "
                         f"{len(self.slots)} rows nor its packed tokens ({self.n_tokens}, from token_slots)")


class RowLoRALinear(nn.Module):
    """A frozen linear layer plus, while `rows` is set, each row's own low-rank update."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.rows: "ActiveRows | None" = None

    def forward(self, x):                                                  # (..., in)
        y = self.base(x)                                                   # (..., out)
        if self.rows is None:
            return y
        return y + self.rows.update(x).to(y.dtype)
