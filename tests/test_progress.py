"""Progress lines: what a user waiting on an evaluation sees, on a terminal and in a log."""
import io

import train
from minipt.progress import Progress

from test_train import args, llama_dir, task_file  # noqa: F401 (fixtures)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_plain_line_per_interval_and_the_last_one_always():
    for every, printed in ((0, list(range(1, 11))), (3600, [10])):
        log = io.StringIO()
        progress = Progress("test", every=every, stream=log)
        for done in range(1, 11):
            progress(done, 10)
        lines = log.getvalue().splitlines()
        assert ([int(line.split()[1].split("/")[0]) for line in lines] == printed
                and "\r" not in log.getvalue())
        assert all("ETA" in line for line in lines[:-1]) and lines[-1].startswith("test: 10/10 rows |")


def test_a_terminal_gets_one_line_rewritten_in_place():
    tty = Terminal()
    progress = Progress("zero-shot", every=3600, stream=tty)
    progress.last -= 1                          # a second has passed
    progress(5, 10)
    progress(10, 10)
    text = tty.getvalue()
    assert text.startswith("\rzero-shot: 5/10 rows") and text.count("\n") == 1 and text.endswith("\n")


def test_train_shows_every_evaluation(llama_dir, task_file, tmp_path, capsys):
    train.main(args(llama_dir, task_file, tmp_path / "out", steps=3, eval_interval=3, eval_examples=6))
    err = capsys.readouterr().err
    for what, n in (("zero-shot test", 7), ("validation at step 3", 6), ("test", 7)):
        assert f"\n{what}: {n}/{n} rows |" in "\n" + err, err
