"""Progress output: a bar on a terminal, plain lines in a log (a batch job's stderr), nothing when quiet."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from ckapipe.progress import Progress
from tests import REPO


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_in_a_log_every_few_seconds_and_at_the_end():
    log = io.StringIO()
    bar = Progress(300, "extract net@digits", "samples", stream=log, every=0)
    bar.update(100, "1.5 MB/s")
    bar.update(100)
    bar.close()
    assert log.getvalue().splitlines() == [
        "extract net@digits: 100/300 samples (33 %), 1.5 MB/s",
        "extract net@digits: 200/300 samples (67 %), 1.5 MB/s",  # the last rate stands until a new one
        "extract net@digits: 200/300 samples (67 %), 1.5 MB/s",  # close: where it stopped
    ]
    bar.update(50)
    assert bar.done == 250 and log.getvalue().count("\n") == 3  # nothing after close


def test_no_line_before_its_time_and_none_when_disabled():
    log = io.StringIO()
    bar = Progress(10, "analyze", "minibatches", stream=log, every=3600)
    bar.update(4)
    assert log.getvalue() == ""
    bar.close()
    assert log.getvalue() == "analyze: 4/10 minibatches (40 %)\n"
    quiet = io.StringIO()
    off = Progress(10, "analyze", "minibatches", enabled=False, stream=quiet, every=0)
    off.update(10)
    off.close()
    assert quiet.getvalue() == "" and off.done == 10


def test_a_bar_on_a_terminal():
    screen = Terminal()
    bar = Progress(64, "extract net@digits", "samples", stream=screen)
    bar.update(32, "3.0 MB/s")
    bar.update(32)
    bar.close()
    text = screen.getvalue()
    assert "\r" in text and "\n" not in text.rstrip("\n")  # one line redrawn in place, not lines
    assert re.search(r"extract net@digits: 100%\|#+\| 64(\.0)?/64(\.0)? \[", text) and "3.0 MB/s" in text


EXTRACT = [sys.executable, "-m", "ckapipe", "extract", "-m", "zoo:mlp2?seed=0", "-b", "100", "--limit", "300"]


def test_the_extract_command_draws_a_bar_on_a_terminal(zoo_cache, tmp_path):
    """The real command under a pseudo-terminal: tqdm's bar, redrawn with carriage returns."""
    (tmp_path / "models").symlink_to(zoo_cache / "models")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    try:
        proc = subprocess.Popen([*EXTRACT, "--cache", str(tmp_path)], stdout=subprocess.PIPE, stderr=terminal,
                                text=True, cwd=REPO)
        os.close(terminal)
        screen = read_all(controller)  # until the command closes its side
        out, _ = proc.communicate(timeout=300)
    finally:
        os.close(controller)
    assert proc.returncode == 0 and "complete, 3/3 minibatches" in out
    assert "\r" in screen and re.search(r"extract mlp2-seed0@digits: 100%\|.*\| 300/300 \[", screen), screen


def test_the_extract_command_writes_plain_lines_to_a_log(zoo_cache, tmp_path):
    """stderr to a file, as in a SLURM job: no carriage returns, a readable line at the end."""
    (tmp_path / "models").symlink_to(zoo_cache / "models")
    log = tmp_path / "job.err"
    with open(log, "w") as stderr:
        proc = subprocess.run([*EXTRACT, "--cache", str(tmp_path)], stdout=subprocess.PIPE, stderr=stderr,
                              text=True, cwd=REPO, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0 and "\r" not in text
    assert re.fullmatch(r"extract mlp2-seed0@digits: 300/300 samples \(100 %\), [\d.]+ MB/s\n", text), text


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
