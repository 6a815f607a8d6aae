"""A frozen base kept in its quantized codes: training through a 4-bit model (QLoRA's idea,
Dettmers et al. 2023, without its NF4 format: the GGUF file's own codes are kept instead).

Every format here is blockwise affine: a row of K weights is cut into groups of G, and

    w = scale * (q - offset) + zero,        q an unsigned code, scale and zero one per group.

GGUF's types fit it (llama.cpp's ggml-quants; the layouts are unpacked in `GGUF_UNPACK`):
- Q8_0: G = 32, w = d * q8 (q8 signed, stored here as q8 + 128);
- Q4_1: G = 32, w = d * q4 + m;      Q5_0: G = 32, w = d * (q5 - 16);
- Q4_K: superblocks of 256 with eight 6-bit scales and minimums: G = 32, w = (d*sc) q4 - dmin*m;
- Q6_K: superblocks of 256 with sixteen 8-bit scales: G = 16, w = (d*sc) * (q6 - 32).
The scales are kept as the fp32 products the GGUF reference computes, so dequantizing gives
the converter's fp32 weights bit for bit, and a quantized base computes exactly what its
fp32 checkpoint does. A checkpoint with no codes (converted from Hugging Face, bf16 say) can
be kept as per-channel int8 instead: G = K, w = absmax/127 * (q - 128), rounded.

Codes of up to 4 bits are stored two to a byte: SmolLM2 holds 0.75 bytes a weight, not 4.
`QuantizedLinear` dequantizes a few rows at a time in forward, and again in backward for
the input's gradient; the weights get none, and no fp32 matrix outlives its product.
"""
import json
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

CODES_FILE = "codes.safetensors"      # beside model.safetensors, written by the GGUF converter
KINDS = ("none", "gguf", "int8")      # train.py's base_quant
CHUNK = 1 << 22                       # weights dequantized at a time (16 MB in fp32)


class QuantizedWeight(nn.Module):
    """The codes of one (N, K) matrix: w = scale * (q - offset) [+ zero], per group of G.
    A module of its own so that a tied embedding and LM head share one copy on any device."""

    def __init__(self, codes, scale, zero, offset: int, bits: int, shape, kind: str):
        super().__init__()
        self.shape, self.offset, self.bits, self.kind = tuple(shape), offset, bits, kind
        self.group = self.shape[1] // scale.size(1)
        if bits <= 4 and codes.size(1) == self.shape[1]:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)            # two codes a byte
        self.register_buffer("codes", codes.contiguous(), persistent=False)   # (N, K) or (N, K/2) uint8
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)      # (N, K/G)
        self.register_buffer("zero", None if zero is None else zero.float().contiguous(), persistent=False)

    def dense(self, rows=slice(None), dtype=torch.float32, scratch=False):
        """The weights of `rows` (a slice or a tensor of row ids) as a dense (n, K) matrix.
        scratch: written into this thread's reusable buffers (`_scratch`), valid only until
        the next call: for a product that uses the block at once."""
        q = self.codes[rows]
        n, K = q.size(0), self.shape[1]
        new = _scratch if scratch else (lambda numel, dtype, device: torch.empty(numel, dtype=dtype, device=device))
        if self.bits <= 4:
            both = new(n * K, torch.uint8, q.device).view(n, K // 2, 2)
            torch.bitwise_and(q, 15, out=both[..., 0])
            torch.bitwise_right_shift(q, 4, out=both[..., 1])
            q = both.view(n, K)
        w = new(n * K, torch.float32, q.device).view(n, K).copy_(q)
        if self.offset:
            w.sub_(self.offset)
        w.view(n, K // self.group, self.group).mul_(self.scale[rows][..., None])
        if self.zero is not None:                                      # added apart: no fused multiply-add
            w.view(n, K // self.group, self.group).add_(self.zero[rows][..., None])
        if dtype == torch.float32:
            return w
        return new(n * K, dtype, w.device).view(n, K).copy_(w)

    def row_blocks(self):
        """Slices of rows, CHUNK weights or fewer each, covering the matrix."""
        N, K = self.shape
        step = max(1, CHUNK // K)
        return [slice(i, min(i + step, N)) for i in range(0, N, step)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


_buffers = threading.local()


def _scratch(numel: int, dtype, device) -> torch.Tensor:
    """A reused buffer of at least `numel` elements, one per thread, dtype and device. A
    training step dequantizes every matrix two or three times; fresh blocks each time leave
    the C heap fragmented, and the process's peak memory twice what it holds (Gemma 3 at a
    batch of 16)."""
    key = (dtype, torch.device(device))
    held = getattr(_buffers, "held", None)
    if held is None:
        held = _buffers.held = {}
    if key not in held or held[key].numel() < numel:
        held[key] = torch.empty(max(numel, CHUNK), dtype=dtype, device=device)
    return held[key][:numel]


def _product(x, weight: QuantizedWeight, bias=None):
    """x @ W.T + bias, W dequantized a block of rows at a time (the bias inside the product,
    as nn.Linear adds it: the same rounding)."""
    blocks = weight.row_blocks()
    if len(blocks) == 1:
        return F.linear(x, weight.dense(dtype=x.dtype, scratch=True), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for rows in blocks:
        out[..., rows] = F.linear(x, weight.dense(rows, x.dtype, scratch=True), None if bias is None else bias[rows])
    return out


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b whose backward dequantizes W again instead of keeping it: dx = dy W.
    Neither W nor b is trained."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight
        blocks = w.row_blocks()
        if len(blocks) == 1:
            return grad @ w.dense(dtype=grad.dtype, scratch=True), None, None
        dy = grad.reshape(-1, w.shape[0])
        dx = dy.new_zeros(dy.size(0), w.shape[1])
        for rows in blocks:
            dx.addmm_(dy[:, rows], w.dense(rows, dy.dtype, scratch=True))
        return dx.view(*grad.shape[:-1], w.shape[1]), None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer from codes: what nn.Linear computes, plus its dense bias."""

    def __init__(self, weight: QuantizedWeight, bias=None, dtype=torch.float32):
        super().__init__()
        self.qweight, self.dtype = weight, dtype
        self.out_features, self.in_features = weight.shape
        self.bias = bias

    @property
    def weight(self):
        """The whole matrix, dequantized: for readers of `.weight`; the forward never builds it."""
        return self.qweight.dense(dtype=self.dtype)

    def forward(self, x):
        return _FrozenLinear.apply(x, self.qweight, self.bias)


class QuantizedEmbedding(nn.Module):
    """Token embeddings from codes: the rows of the ids, dequantized in `dtype`; `scaled`:
    times sqrt(dim) rounded to dtype, as layers.ScaledEmbedding (Gemma)."""

    def __init__(self, weight: QuantizedWeight, dtype, scaled: bool):
        super().__init__()
        self.qweight, self.dtype, self.scaled = weight, dtype, scaled
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def weight(self):
        return self.qweight.dense(dtype=self.dtype)

    def rows(self, ids):
        """Unscaled rows (n, C) of a 1-D tensor of ids."""
        return self.qweight.dense(ids.to(self.qweight.codes.device), self.dtype)

    def scale(self):
        """What the rows are multiplied by (prompts.soft_prompt.embedding_scale reads it)."""
        factor = self.embedding_dim ** 0.5 if self.scaled else 1.0
        return torch.tensor(factor, dtype=self.dtype, device=self.qweight.codes.device)

    def forward(self, idx):
        x = self.rows(idx.flatten()).view(*idx.shape, self.embedding_dim)
        return x * self.scale() if self.scaled else x


# ---- GGUF blocks -> codes ------------------------------------------------------------------

def _f16(b):
    """fp16 values from their two little-endian bytes (..., 2) uint8, as fp32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(b):
    """(..., n) bytes -> (..., 2n) codes: the n low nibbles, then the n high ones."""
    return torch.cat((b & 15, b >> 4), dim=-1)


def _q8_0(blk):                                            # (N, B, 34): d, 32 x int8
    return blk[..., 2:] ^ 0x80, _f16(blk[..., :2])[..., None], None, 128, 8


def _q4_1(blk):                                            # (N, B, 20): d, m, 16 bytes
    return _nibbles(blk[..., 4:]), _f16(blk[..., 0:2])[..., None], _f16(blk[..., 2:4])[..., None], 0, 4


def _q5_0(blk):                                            # (N, B, 22): d, 32 high bits, 16 bytes
    high = blk[..., 2:6].contiguous().view(torch.int32)   # (N, B, 1): bit i for weight i
    bits = (high >> torch.arange(32, dtype=torch.int32)) & 1
    return _nibbles(blk[..., 6:]) | (bits.to(torch.uint8) << 4), _f16(blk[..., :2])[..., None], None, 16, 5


def _q4_k(blk):                                            # (N, B, 144): d, dmin, 12 scale bytes, 128 bytes
    d, dmin, s = _f16(blk[..., 0:2]), _f16(blk[..., 2:4]), blk[..., 4:16].long()
    # eight 6-bit scales and minimums: the first four in bytes 0-3 and 4-7, the last four
    # split between bytes 8-11 (low bits) and the top two bits of bytes 0-7
    sc = torch.cat((s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)), dim=-1)
    mn = torch.cat((s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)), dim=-1)
    q = blk[..., 16:].unflatten(-1, (4, 32))               # four runs of 32 bytes: 2 groups each
    q = torch.cat((q & 15, q >> 4), dim=-1).flatten(-2)    # (N, B, 256), group by group
    scale, zero = d[..., None] * sc.float(), -(dmin[..., None] * mn.float())   # (N, B, 8)
    return q, scale, zero, 0, 4


def _q6_k(blk):                                            # (N, B, 210): 128 low, 64 high, 16 scales, d
    low = blk[..., :128].unflatten(-1, (2, 64))            # per half of 128 weights:
    low = torch.cat((low & 15, low >> 4), dim=-1)          # (N, B, 2, 128)
    high = blk[..., 128:192].unflatten(-1, (2, 1, 32))     # 2 bits each, four runs of 32
    high = ((high >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3).flatten(-2)
    q = (low | (high << 4)).flatten(-2)                    # (N, B, 256)
    scale = _f16(blk[..., 208:210])[..., None] * blk[..., 192:208].contiguous().view(torch.int8).float()
    return q, scale, None, 32, 6


# GGUF type -> (bytes per block, weights per block, unpack)
GGUF_UNPACK = {"Q8_0": (34, 32, _q8_0), "Q4_1": (20, 32, _q4_1), "Q5_0": (22, 32, _q5_0),
               "Q4_K": (144, 256, _q4_k), "Q6_K": (210, 256, _q6_k)}


def from_gguf_blocks(raw: np.ndarray, kind: str, shape, permute=None) -> QuantizedWeight:
    """The codes of a GGUF tensor: raw (N, bytes a row) uint8 of type `kind`. permute: a
    function of a (N, ...) tensor that reorders its rows (llama.cpp's q/k layout), or None."""
    size, per_block, unpack = GGUF_UNPACK[kind]
    N, K = shape
    blk = torch.from_numpy(np.ascontiguousarray(raw)).view(N, K // per_block, size)
    q, scale, zero, offset, bits = unpack(blk)
    q, scale = q.reshape(N, K), scale.reshape(N, -1)
    zero = None if zero is None else zero.reshape(N, -1)
    if permute is not None:
        q, scale, zero = permute(q), permute(scale), None if zero is None else permute(zero)
    return QuantizedWeight(q, scale, zero, offset, bits, shape, kind)


def int8_per_channel(w: torch.Tensor) -> QuantizedWeight:
    """Per-row int8 codes of a dense (N, K) weight: scale = absmax / 127, q = round(w / scale)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)   # (N, 1)
    q = (w / scale).round().clamp(-127, 127).to(torch.int16) + 128
    return QuantizedWeight(q.to(torch.uint8), scale, None, 128, 8, w.shape, "int8")


# ---- the codes file --------------------------------------------------------------------------

SETTINGS = ("shape", "offset", "bits", "kind")


def save_codes(path: Path, weights: dict) -> None:
    """{minipt key: QuantizedWeight} -> one safetensors file, their settings in its metadata."""
    from safetensors.torch import save_file
    tensors = {f"{key}.{name}": t for key, w in weights.items() for name, t in w.named_buffers()}
    settings = {key: {s: getattr(w, s) for s in SETTINGS} for key, w in weights.items()}
    save_file(tensors, path, metadata={"minipt_codes": json.dumps(settings)})


def read_codes(path: Path) -> dict:
    """{minipt key: QuantizedWeight} of a codes file."""
    from .tensorfile import read_tensors
    with safe_open(path, framework="pt") as f:                # the header only
        settings = json.loads((f.metadata() or {}).get("minipt_codes", "{}"))
    tensors = read_tensors(path)                              # read, not mapped: no second copy in memory
    return {key: QuantizedWeight(tensors[f"{key}.codes"], tensors[f"{key}.scale"], tensors.get(f"{key}.zero"),
                                 s["offset"], s["bits"], s["shape"], s["kind"])
            for key, s in settings.items()}


# ---- a base model with its frozen weights in codes -------------------------------------------

def check_quant(directory, kind: str, config) -> None:
    """A one-line ValueError if `kind` cannot be applied to the checkpoint, before it loads."""
    if kind not in KINDS:
        raise ValueError(f"base_quant={kind!r} unknown; choose one of {', '.join(KINDS)}")
    if kind == "none":
        return
    if config.model_type == "t5":
        raise ValueError(f"base_quant={kind}: for decoder bases (GPT-2, Llama, Qwen2, Gemma 3), not T5")
    if kind == "gguf" and not (Path(directory) / CODES_FILE).exists():
        raise ValueError(f"base_quant=gguf: {directory} has no {CODES_FILE}: its weights have no codes "
                         "(a checkpoint converted from a GGUF file has them; reconvert it with "
                         "`python -m minipt.convert FILE.gguf DIR --force`, or use base_quant=int8)")


def quantized_targets(model) -> dict:
    """{weight key: module name} of what a quantized base keeps in codes: every linear
    layer (the LM head too) and the token embedding."""
    out = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    out["embed.weight"] = "embed"
    return out


def load_quantized(directory, model, kind: str, dtype, device):
    """Fill `model` (built on meta) from a checkpoint directory, its linear layers and token
    embedding as codes (`kind` gguf: the codes file; int8: quantized here tensor by tensor),
    everything else dense in dtype. The dense matrices are read one at a time, never all."""
    directory = Path(directory)
    codes = read_codes(directory / CODES_FILE) if kind == "gguf" else {}
    targets = quantized_targets(model)
    dense, kept = {}, {}
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            if key in codes and key in targets:
                kept[key] = codes[key]
            elif key in targets and kind == "int8":
                t = f.get_tensor(key)
                kept[key] = int8_per_channel(t)
            else:
                t = f.get_tensor(key)
                dense[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    dtype = dtype or torch.float32
    for key, weight in kept.items():
        name = targets[key]
        old = model.get_submodule(name)
        if name == "embed":
            new = QuantizedEmbedding(weight, dtype, scaled=hasattr(old, "scale"))
        else:
            new = QuantizedLinear(weight, old.bias, dtype)   # the bias (on meta) is loaded with the rest
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if model.config.tie_embeddings and "embed.weight" in kept:
        model.lm_head = QuantizedLinear(kept["embed.weight"], dtype=dtype)
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if not isinstance(model.embed, QuantizedEmbedding):
        model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'}: {'missing' if missing else 'unexpected'} tensor "
                         f"{(missing or unexpected)[0]}")
    from .prompts.files import checkpoint_embedding_sha256
    model.embedding_sha256 = checkpoint_embedding_sha256(directory)   # prompt files name the dense base
    return model.to(device)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes the model's weights take, bytes they would take dense in fp32)."""
    seen, held, fp32 = set(), 0, 0
    for m in model.modules():
        if isinstance(m, QuantizedWeight) and id(m) not in seen:
            seen.add(id(m))
            held, fp32 = held + m.nbytes(), fp32 + 4 * m.shape[0] * m.shape[1]
    for p in {id(p): p for p in model.parameters()}.values():
        held, fp32 = held + p.numel() * p.element_size(), fp32 + 4 * p.numel()
    return held, fp32
