"""Decoding from the checkpoint's own 4-bit codes.

A one-row product in decoding is bound by reading the weights: SmolLM2's are 540 MB in fp32,
read once per token. But they came from a GGUF file that stores them in ~0.6 bytes each:
- Q4_1 (every projection): blocks of 32 weights w = d*q + m, q a 4-bit code, d and m fp16;
- Q8_0 (the embedding, tied to the LM head): w = d*q, q an 8-bit code.
The converter expands them to fp32, bit for bit. `pack_for_decoding` finds the codes again in
those fp32 weights, and keeps them only where d*q + m rebuilds every weight exactly, so a
checkpoint that never was 4-bit (an fp32 or bf16 one) is left as it is. Products of a few
rows then go to PyTorch's int4 CPU kernel, which reads ~6x fewer bytes; prefill, training
and everything else keep the fp32 weights.

The kernel's inputs are bf16: each projection's input is rounded to bf16, and so are d and
m + 8d (it computes w = (q - 8) * scale + zero). Everything between the projections (norms,
attention, residuals) stays fp32. Measured on SmolLM2 against the fp32 model's next-token
distributions (tests/test_packed.py), this is closer to fp32 than running the model in bf16.
"""
import torch

GROUP = 32                      # weights per GGUF block, one scale (and minimum) each
MAX_ROWS = 16                   # past this the int4 kernel, bound by its arithmetic, loses to fp32


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def q4_1_codes(w):
    """(q, d, m) with w == d*q + m exactly, blockwise: q (N, K) in 0..15, d and m (N, K/32)
    fp16 values; None if w is not such a grid. Quantizing a block maps its minimum to q = 0
    and its maximum to 15, so m is the block's minimum and d its range / 15 (rounded to fp16)."""
    if w.dim() != 2 or w.size(1) % GROUP:
        return None
    b = w.float().view(w.size(0), -1, GROUP)
    m = b.amin(-1, keepdim=True)
    d = ((b.amax(-1, keepdim=True) - m) / 15).half().float()
    q = ((b - m) / torch.where(d > 0, d, 1)).round().clamp(0, 15)
    if not (torch.equal(q * d + m, b) and torch.equal(m.half().float(), m)):
        return None
    return q.view_as(w).to(torch.int32), d.squeeze(-1), m.squeeze(-1)


def q8_0_codes(w):
    """(q, d) with w == d*q exactly, blockwise: q (N, K) in -127..127, d (N, K/32) fp16
    values; None otherwise. The block's largest magnitude is quantized to +-127."""
    if w.dim() != 2 or w.size(1) % GROUP:
        return None
    b = w.float().view(w.size(0), -1, GROUP)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = (b / torch.where(d > 0, d, 1)).round().clamp(-127, 127)
    if not (torch.equal(q * d, b) and torch.equal(d.half().float(), d)):
        return None
    return q.view_as(w).to(torch.int32), d.squeeze(-1)


def planes_of(weight):
    """[(q, scale, zero), ...]: uint8 4-bit codes (N, K) and per-block (N, K/32) scale and zero
    of planes whose (q - 8) * scale + zero add up to `weight`, from the GGUF codes it holds
    exactly; None if it holds none."""
    found = q4_1_codes(weight)
    if found is not None:
        q, d, m = found
        return [(q.to(torch.uint8), d, m + 8 * d)]                # d*q + m = (q - 8)*d + (m + 8d)
    found = q8_0_codes(weight)
    if found is not None:
        # q + 128 = 16h + l with h, l in 0..15: d*q = 16d*(h - 8) + d*(l - 8) + 8d
        q, d = found
        u = (q + 128).to(torch.uint8)
        return [(u >> 4, 16 * d, torch.zeros_like(d)), (u & 15, d, 8 * d)]
    return None


class PackedWeight:
    """The weights of one or more Linear layers that read the same input, stacked and stored
    as 4-bit planes, each (codes packed for the CPU kernel, per-block scale and zero), whose
    products add up to x @ w.T (+ bias). It remembers which tensors, at which versions, it was
    made from, so that a later update of a weight is noticed (`applies`)."""

    def __init__(self, linears, planes):
        self.planes = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                        # (K/32, N, 2)
                        torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16())
                       for q, scale, zero in planes]
        self.sizes = [lin.out_features for lin in linears]
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
        self.weights = [lin.weight for lin in linears]
        self.sources = [(w.data_ptr(), w._version) for w in self.weights]

    @classmethod
    def stack(cls, linears, planes):
        """The packed weight of these layers (all fed the same input), given each one's
        `planes_of`; None unless every weight has planes of the same kind, all or none have
        a bias, and the rows come in multiples of 16."""
        if (any(p is None for p in planes) or len({len(p) for p in planes}) > 1
                or len({lin.bias is None for lin in linears}) > 1
                or sum(lin.out_features for lin in linears) % 16):
            return None                                         # the kernel packs output rows by 16
        return cls(linears, [[torch.cat(parts) for parts in zip(*same)] for same in zip(*planes)])

    def applies(self, x) -> bool:
        """Whether to multiply x by this packed copy: a few rows on CPU without autograd, and
        no weight changed since packing. Compiled code cannot read a tensor's data_ptr or
        version: `generation` checks `unchanged` before it runs a compiled step instead."""
        return (x.numel() // x.size(-1) <= MAX_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled()
                and (torch.compiler.is_compiling() or self.unchanged()))

    def unchanged(self) -> bool:
        return all(src == (w.data_ptr(), w._version) for src, w in zip(self.sources, self.weights))

    def __call__(self, x):
        """x @ w.T (+ bias) for the stacked weights, in x's dtype."""
        x2 = x.reshape(-1, x.size(-1)).bfloat16()
        y = self.bias
        for codes, scale_zero in self.planes:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, codes, GROUP, scale_zero)
            y = part.float() if y is None else y + part
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def pack_for_decoding(model) -> int:
    """Give every `layers.Linear` of `model` whose weight holds exact GGUF codes a packed copy
    for products of up to MAX_ROWS rows (CPU, no autograd), and the modules that project one
    input several ways (attention's q, k, v; SwiGLU's gate and up) one for all of them, which
    saves kernel calls. Returns how many Linear layers were packed. Pack after training: a
    weight updated later falls back to its fp32 product."""
    from .layers import Linear
    if not available():
        raise RuntimeError(f"pack_for_decoding: torch {torch.__version__} has no int4 CPU kernel "
                           "(aten._weight_int4pack_mm_for_cpu)")
    planes = {}                                                 # Linear -> planes_of its weight, found once
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear) and module.weight.device.type == "cpu":
                planes[module] = planes_of(module.weight.detach())
                module.packed = PackedWeight.stack([module], [planes[module]])
        for module in model.modules():
            linears = [getattr(module, name) for name in getattr(module, "fusable_projections", ())]
            if linears and all(planes.get(lin) is not None for lin in linears):
                module.packed_projections = PackedWeight.stack(linears, [planes[lin] for lin in linears])
    return sum(module.packed is not None for module in planes)


def packs_unchanged(model) -> bool:
    """Whether no weight of `model` that has a packed copy changed since packing."""
    packs = (getattr(m, name, None) for m in model.modules() for name in ("packed", "packed_projections"))
    return all(pack.unchanged() for pack in packs if pack is not None)
