"""A pytest plugin for nbval: read the kernel's IOPub messages while a cell runs, not only after it.

nbval 0.11 waits for a cell's ``execute_reply`` on the shell channel before it reads a single IOPub message (the
cell's output), then gives each one 5 s (a constant, not an option: nbval issues #136, #151, #231). Meanwhile ZeroMQ
holds the unread output only up to its high-water marks (1,000 messages a socket) and the TCP buffers; past them the
kernel's PUB socket drops messages, the closing ``status: idle`` among them, and nbval fails the cell with "Timeout
of 5 seconds exceeded waiting for output" though the cell ran to the end. Measured here: a cell printing 3,000
flushed 4 kB lines fails that way, and ``evaluate.ipynb``'s evals at the smoke profile, with fresh eval caches, send
1,864 progress-bar messages in 215 s, which failed once in CI on a slow CPU.

With this plugin (``make test``'s notebook stage loads it: ``-p tests.nbval_iopub``) nbval's kernel wrapper moves
every IOPub message into its own queue while it waits for the reply, and hands them back in order when nbval reads
IOPub: the same messages, none dropped. Nothing else in nbval changes."""

from __future__ import annotations

import collections
import time
from queue import Empty

from nbval.kernel import RunningKernel

POLL_S = 0.05
"""While a cell runs: the longest wait on the shell channel before IOPub is drained again."""

_await_reply = RunningKernel.await_reply
_get_message = RunningKernel.get_message


def _queue(kernel: RunningKernel) -> collections.deque:
    return kernel.__dict__.setdefault("_iopub_read_early", collections.deque())


def _drain(kernel: RunningKernel) -> None:
    queue = _queue(kernel)
    while True:
        try:
            queue.append(kernel.kc.get_iopub_msg(timeout=0))
        except Empty:
            return


def get_message(self: RunningKernel, stream: str, timeout=None):
    """nbval's, but IOPub messages already read come first, in the order they arrived."""
    if stream == "iopub" and _queue(self):
        return _queue(self).popleft()
    return _get_message(self, stream, timeout=timeout)


def await_reply(self: RunningKernel, msg_id, timeout=None):
    """nbval's wait for the reply to ``msg_id`` (Empty after ``timeout`` seconds), draining IOPub all along."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        _drain(self)
        wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        try:
            return _await_reply(self, msg_id, timeout=wait)
        except Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise


RunningKernel.get_message = get_message
RunningKernel.await_reply = await_reply
