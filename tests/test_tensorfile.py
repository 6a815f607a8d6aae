"""minipt's safetensors reader against the safetensors package, and its refusals of files
whose header does not fit the file (checked before anything is allocated)."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from minipt.tensorfile import read_tensors


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "m": torch.tensor([True, False]),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"note": "x"})
    back = read_tensors(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    cast = read_tensors(tmp_path / "t.safetensors", dtype=torch.bfloat16)
    assert cast["w"].dtype == torch.bfloat16 and torch.equal(cast["w"], tensors["w"].bfloat16())
    assert cast["i"].dtype == torch.int64                               # only floating tensors are cast


def raw_file(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"\x01\x02"), "shorter than its 8-byte header length"),
    (lambda p: p.write_bytes((10**12).to_bytes(8, "little") + b"{}"),
     "header claims 1,000,000,000,000 bytes"),
    (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}},
                        b"\0" * 16),
     "tensor 'w': F32[1048576, 1048576] needs 4,398,046,511,104 bytes"),
    (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "the data section has 8"),                                              # a truncated file
    (lambda p: raw_file(p, {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2),
     "tensor 'w': bad header entry"),
])
def test_inconsistent_headers_are_refused(tmp_path, make, words):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=re.escape(words)):
        read_tensors(path)
