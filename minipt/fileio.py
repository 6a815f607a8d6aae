"""Writing files so that a crash never leaves half of one: the run's checkpoints, config,
metrics, plot and prompt files all go through `atomic_write`."""
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over path: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
