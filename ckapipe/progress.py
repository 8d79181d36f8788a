"""Progress of long work on stderr: a bar on a terminal, a plain line every few seconds in a log.

Batch jobs write their stderr to files, where a bar's carriage returns make
one unreadable line; there the same progress is a line like
``extract cnn3@digits: 640/1797 samples (35 %), 12.1 MB/s`` every ``every`` seconds.
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

PLAIN_EVERY = 10.0  # seconds between plain lines


class Progress:
    """``update(n)`` as work is done, ``close()`` at the end; silent when not enabled."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, stream=None,
                 every: float = PLAIN_EVERY):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done, self.postfix = 0, ""
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, postfix: str = "") -> None:
        with self.lock:
            self.done += n
            self.postfix = postfix or self.postfix
            if not self.enabled:
                return
            if self.bar is not None:
                if postfix:
                    self.bar.set_postfix_str(postfix, refresh=False)
                self.bar.update(n)
            elif time.monotonic() - self.last >= self.every:
                self._line()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            elif self.enabled and self.total:
                self._line()
            self.enabled = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _line(self) -> None:
        self.last = time.monotonic()
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{share}{tail}", file=self.stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
