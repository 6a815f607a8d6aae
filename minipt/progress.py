"""Progress of long loops (evaluations over hundreds of rows take minutes on a CPU): rows
done, rate and time left on stderr, one line rewritten in place on a terminal, a plain line
every `every` seconds and one at the end in a log file."""
import sys
import time


class Progress:
    """Call it as `progress(done, total)` from the loop; it decides when to print."""

    def __init__(self, what: str, unit: str = "rows", every: float = 10.0, stream=None):
        self.what, self.unit, self.every = what, unit, every
        self.stream = stream or sys.stderr
        # nothing before the first interval: a quick loop prints its last line only
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        tty = self.stream.isatty()
        finished = done >= total
        if not finished and now - self.last < (0.2 if tty else self.every):
            return
        self.last = now
        seconds = max(now - self.start, 1e-9)
        rate = done / seconds
        when = f"{seconds:.0f} s" if finished else f"ETA {(total - done) / rate:.0f} s" if rate else "ETA ?"
        line = f"{self.what}: {done}/{total} {self.unit} | {rate:.1f} {self.unit}/s | {when}"
        self.stream.write(("\r" + line + "\033[K" + ("\n" if finished else "")) if tty else line + "\n")
        self.stream.flush()
