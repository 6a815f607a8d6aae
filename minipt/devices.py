"""The device a command is told to use, checked before any model loads."""
import torch


def check_device(name: str, what: str, use_cpu: str) -> torch.device:
    """torch.device(name) if this process can use it, else a one-line ValueError that starts
    with `what` (the option as the command spells it) and says why; use_cpu: the CPU's spelling."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: not a device; use {use_cpu}, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{what}: {device.type} devices are not supported; use {use_cpu}, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise ValueError(f"{what}: CUDA is not available ({build}); use {use_cpu}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ValueError(f"{what}: no such GPU, this machine has {count} ({have})")
    return device
