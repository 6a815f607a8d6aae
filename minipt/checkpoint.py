"""minipt checkpoint directories: `config.json` + `model.safetensors` + tokenizer files.

`load_base(dir)` rebuilds the model from its config and loads the weights without
unpickling anything (safetensors only). `check_checkpoint(dir)` finds what loading would
trip over in a fraction of a second, before any weight is read.
"""
import ctypes
import os
from pathlib import Path

import torch
from .config import GPTConfig, T5Config, load_config
from .tensorfile import read_header, read_tensors

CONVERTIBLE = (".gguf", ".safetensors", ".bin")   # files people pass where a checkpoint directory is expected


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """A dtype name with "auto" made concrete: bfloat16 where the hardware multiplies it (a GPU
    of compute capability 8.0 or later, Ampere on; an x86 CPU with AVX-512 or AMX), else float32.
    On an AVX2-only CPU (AMD Zen 3, say) PyTorch multiplies bf16 in a scalar fallback, about 100x
    slower than float32; a V100 or T4 emulates it, which is_bf16_supported() counts unless told not to."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    return "bfloat16" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "float32"


def build_model(config):
    """An uninitialised-weights model for a config (call under torch.device('meta') to allocate nothing)."""
    if isinstance(config, GPTConfig):
        from .gpt import GPT
        return GPT(config)
    if isinstance(config, T5Config):
        from .t5 import T5
        return T5(config)
    raise TypeError(f"unknown config type {type(config).__name__}")


def load_model(directory, dtype=None, device="cpu", quant="none"):
    """Model from a minipt checkpoint directory, in eval mode. dtype casts floating weights;
    quant (minipt.quantized.KINDS): gguf or int8 keeps the linear layers and the token
    embedding in codes, frozen."""
    directory = Path(directory)
    config = load_config(directory)
    if quant != "none":
        from . import quantized
        with torch.device("meta"):
            model = build_model(config)
        model = quantized.load_quantized(directory, model, quant, dtype, device)
        _return_freed_memory()
        return model.eval()
    path = directory / "model.safetensors"
    try:
        state = read_tensors(path, dtype, device)       # cast tensor by tensor: no second whole copy
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e.strerror or e})") from None
    with torch.device("meta"):
        model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()  # assign=True replaced the shared Parameter: share it again
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: {'missing' if missing else 'unexpected'} tensor "
                         f"{(missing or unexpected)[0]}")
    _return_freed_memory()
    return model.eval()


def _return_freed_memory():
    """glibc keeps the buffers loading freed (each tensor's read buffer, the fp32 originals of
    cast weights) in its heap, ~0.15 GB for SmolLM2 that would count in the
    process's memory until exit; malloc_trim hands them back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def check_checkpoint(directory):
    """(config, tokenizer) of a checkpoint directory whose weights file holds every tensor
    the model needs, in its shape; a one-line ValueError or FileNotFoundError otherwise."""
    from .tokenizer import load_tokenizer
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        convertible = directory.suffix in CONVERTIBLE
        hint = " (convert it first: python -m minipt.convert SRC OUT)" if convertible else ""
        raise ValueError(f"{directory}: a file, not a minipt checkpoint directory{hint}")
    config = load_config(directory)
    path = directory / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {directory} a minipt checkpoint?)")
    with open(path, "rb") as f:
        header, _ = read_header(f, path, os.path.getsize(path))
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in build_model(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in header:
            raise ValueError(f"{path}: missing tensor {name}")
        if header[name]["shape"] != shape:
            raise ValueError(f"{path}: tensor {name} is {header[name]['shape']}, the config needs {shape}")
    return config, load_tokenizer(directory)


def load_base(directory, dtype=None, device="cpu", quant="none"):
    """(model, tokenizer) from a minipt checkpoint directory."""
    from .tokenizer import load_tokenizer
    return load_model(directory, dtype, device, quant), load_tokenizer(directory)
