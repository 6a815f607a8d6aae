"""Reading a `.safetensors` file one tensor at a time, header checked before any allocation.

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data. The header
is checked against the file size first, so a file that claims a terabyte tensor is an
error, not an out-of-memory. Each tensor is then read with plain file reads (not a memory
map, whose touched pages would all count as the process's memory) and cast on the spot,
so loading fp32 weights as bf16 peaks at the bf16 model plus one fp32 tensor, not both
models whole.
"""
import json
import math
import os

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # bytes; safetensors itself refuses headers above 100 MB


def read_header(f, path, size: int) -> tuple[dict, int]:
    """(entries without __metadata__, offset where the data starts); ValueError if inconsistent."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(raw, "little")
    if n > min(MAX_HEADER, size - 8):
        raise ValueError(f"{path}: header claims {n:,} bytes, the file has {size - 8:,} after the length")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: bad header entry {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r}: {entry['dtype']}{shape} needs {nbytes:,} bytes at "
                             f"[{begin}, {end}), the data section has {data_size:,}")
    return header, 8 + n


def read_tensors(path, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """{name: tensor} of a safetensors file; dtype casts the floating-point ones."""
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        header, start = read_header(f, path, size)
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=DTYPES[entry["dtype"]]) if buf else torch.empty(0, dtype=DTYPES[entry["dtype"]])
            t = t.reshape(entry["shape"])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t.to(device)
    return out
