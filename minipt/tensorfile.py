"""Reading a `.safetensors` file one tensor at a time, header checked before any allocation;
and the same check for a GGUF file's header before the converter reads it.

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data. The header
is checked against the file size first, so a file that claims a terabyte tensor is an
error, not an out-of-memory. Each tensor is then read with plain file reads (not a memory
map, whose touched pages would all count as the process's memory) and cast on the spot,
so loading fp32 weights as bf16 peaks at the bf16 model plus one fp32 tensor, not both
models whole.

A GGUF file (llama.cpp) is a header of metadata entries and a tensor table, then the
aligned data; `check_gguf` walks that header checking every length and offset against the
file size, so a truncated file or one that claims a terabyte tensor is refused with the
entry named before the `gguf` package maps or dequantizes anything.
"""
import json
import math
import mmap
import os
import pickle
import re
import struct

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
            t = (torch.frombuffer(buf, dtype=DTYPES[entry["dtype"]]) if buf
                 else torch.empty(0, dtype=DTYPES[entry["dtype"]]))
            t = t.reshape(entry["shape"])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t.to(device)
    return out


def read_row_blocks(path, name: str, rows: int):
    """The 2-D tensor `name` of a safetensors file, `rows` rows at a time, read (not memory
    mapped: the pages of a map count in the process's memory) so that one block is in memory."""
    with open(path, "rb") as f:
        header, start = read_header(f, path, os.path.getsize(path))
        entry = header[name]
        dtype, (n, width) = DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = width * dtype.itemsize
        for first in range(0, n, rows):
            count = min(rows, n - first)
            buf = bytearray(count * row_bytes)
            f.seek(start + entry["data_offsets"][0] + first * row_bytes)
            f.readinto(buf)
            yield torch.frombuffer(buf, dtype=dtype).view(count, width)


def load_pickle(path, mapped: bool = False):
    """torch.load with weights_only=True (tensors, numbers, strings, lists, dicts): a pickle
    that would build any other object, and so could run code, is refused by name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {found[1]}" if found else str(e).splitlines()[0]
        raise ValueError(f"{path}: refused, the pickle holds more than tensors ({what})") from None


# ---- GGUF headers -------------------------------------------------------------------------

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def check_gguf(path) -> list[tuple[str, str, tuple]]:
    """[(name, GGML type name, dims)] of a GGUF file's tensors; ValueError naming the entry if
    any length or offset in the header points outside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(n: int, what: str) -> int:  # the offset of the next n bytes, once they are known to exist
            nonlocal pos
            if n > size - pos:
                raise ValueError(f"{path}: {what} needs {n:,} bytes at offset {pos:,}, the file has {size:,}")
            pos += n
            return pos - n

        def number(fmt: str, what: str):
            return struct.unpack_from(fmt, m, take(struct.calcsize(fmt), what))[0]

        def string(what: str) -> str:
            n = number("<Q", what)
            start = take(n, what)
            return m[start:start + n].decode("utf-8", "replace")

        def value(kind: int, what: str):
            if kind in GGUF_SCALARS:
                return number(GGUF_SCALARS[kind], what)
            if kind == GGUF_STRING:
                return string(what)
            if kind != GGUF_ARRAY:
                raise ValueError(f"{path}: {what}: unknown GGUF value type {kind}")
            item, n = number("<I", what), number("<Q", what)
            if item in GGUF_SCALARS:
                take(n * struct.calcsize(GGUF_SCALARS[item]), what)  # skipped, not read
            elif n * 8 > size - pos:  # every string or array item has at least an 8-byte length
                raise ValueError(f"{path}: {what}: claims {n:,} items, "
                                 f"the file has {size - pos:,} bytes left")
            else:
                for _ in range(n):
                    value(item, what)
            return None

        if m[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (starts with {m[:4]!r}, not b'GGUF')")
        take(4, "magic")
        version = number("<I", "version")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} not supported (2, 3)")
        n_tensors, n_kv = number("<Q", "tensor count"), number("<Q", "metadata count")
        if n_tensors * 24 + n_kv * 13 > size - pos:  # the smallest possible table entry and metadata entry
            raise ValueError(f"{path}: header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, "
                             f"more than its {size:,} bytes can hold")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata entry {i}")
            v = value(number("<I", f"metadata {key!r}"), f"metadata {key!r}")
            if key == "general.alignment":
                alignment = v
        if not isinstance(alignment, int) or alignment < 1:
            raise ValueError(f"{path}: general.alignment {alignment!r} is not a positive integer")
        table = []
        for i in range(n_tensors):
            name = string(f"tensor {i}")
            what = f"tensor {name!r}"
            n_dims = number("<I", what)
            if n_dims > 4:
                raise ValueError(f"{path}: {what}: {n_dims} dimensions, GGUF allows at most 4")
            dims = tuple(number("<Q", what) for _ in range(n_dims))
            kind, offset = number("<I", what), number("<Q", what)
            try:
                kind = GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"{path}: {what}: unknown GGML type {kind}") from None
            table.append((name, kind, dims, offset))
        data = size - (pos + alignment - 1) // alignment * alignment
    out = []
    for name, kind, dims, offset in table:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r}: rows of {dims[0]} do not split into "
                             f"{kind.name} blocks of {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset + nbytes > data:
            raise ValueError(f"{path}: tensor {name!r}: {kind.name}{list(dims)} needs {nbytes:,} bytes "
                             f"at offset {offset:,}, the data section has {max(data, 0):,}")
        out.append((name, kind.name, dims))
    return out
