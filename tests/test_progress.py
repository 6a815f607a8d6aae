"""Progress lines: what a user waiting on an evaluation sees, on a terminal and in a log."""
import io

import train
from minipt.progress import Progress

from test_train import args, llama_dir, task_file  # noqa: F401 (fixtures)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_and_the_last_one_always():
    log = io.StringIO()
    progress = Progress("test", every=3600, stream=log)
    for done in range(1, 11):
        progress(done, 10)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("test: 1/10 rows") and "ETA" in lines[0]
    assert lines[1].startswith("test: 10/10 rows |") and lines[1].endswith(" s") and "\r" not in log.getvalue()


def test_a_terminal_gets_one_line_rewritten_in_place():
    tty = Terminal()
    progress = Progress("zero-shot", every=3600, stream=tty)
    progress(5, 10)
    progress(10, 10)
    text = tty.getvalue()
    assert text.startswith("\rzero-shot: 5/10 rows") and text.count("\n") == 1 and text.endswith("\n")


def test_train_shows_every_evaluation(llama_dir, task_file, tmp_path, capsys):
    train.main(args(llama_dir, task_file, tmp_path / "out", steps=3, eval_interval=3, eval_examples=6))
    err = capsys.readouterr().err
    for what, n in (("zero-shot test", 7), ("validation at step 3", 6), ("test", 7)):
        assert f"\n{what}: {n}/{n} rows |" in "\n" + err, err
