"""Ctrl-C where Python cannot raise it safely: inside C calls that call back into Python, and in children.

* `deferred_interrupt()`: SIGINT is recorded instead of raised while the block runs (a KeyboardInterrupt
  raised inside a ctypes callback, e.g. llama.cpp's log callback, is printed and swallowed, and the C code
  carries on), then raised as KeyboardInterrupt when the block ends. Also used to make a publish step
  (several renames plus a manifest) all-or-nothing with respect to Ctrl-C.
* `run_child()`: a long C job (llama.cpp's quantizer) runs in a child process, so Ctrl-C ends it at once:
  the child starts with SIGINT blocked (a Ctrl-C sent to the whole group, as a terminal does, would
  otherwise print a KeyboardInterrupt traceback from wherever the child's Python happens to be), the
  parent takes the KeyboardInterrupt, kills the child, waits for it and re-raises. The child also dies
  with its parent (`die_with_parent`), so a SIGKILLed run leaves no orphan writing into a folder the next
  run owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT until the block ends, then raise KeyboardInterrupt if one arrived meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; elsewhere there is nothing to defer
        return
    old = signal.getsignal(signal.SIGINT)
    if old in (signal.SIG_IGN, None):
        yield  # SIGINT is ignored (e.g. started with nohup): keep it that way
        return
    got: list[int] = []

    def record(signum: int, _frame: FrameType | None) -> None:
        got.append(signum)

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


def run_child(args: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Run `args` to completion and return its exit status; Ctrl-C kills it and raises KeyboardInterrupt.

    The child inherits a signal mask blocking SIGINT (exec keeps it): Ctrl-C is the parent's to handle.
    A child that dies of SIGINT anyway (one that unblocked it) also counts as Ctrl-C.

    The mask is per thread: a process-wide SIGINT can still land in another thread of this process
    (torch's, tqdm's), and Python would then raise KeyboardInterrupt inside Popen, after the fork, with
    no handle on the child to kill. So SIGINT is also recorded, not raised, until `proc` exists.
    """
    proc: subprocess.Popen | None = None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with deferred_interrupt():
            proc = subprocess.Popen(list(args), env=env)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a Ctrl-C held meanwhile is raised here
        rc = proc.wait()
    except BaseException:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            with contextlib.suppress(OSError, ValueError):
                print(file=sys.stderr, flush=True)  # end the line the child's log may have left half-written
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if rc == -signal.SIGINT:
        raise KeyboardInterrupt
    return rc


def die_with_parent(parent_pid: int) -> None:
    """In a child of `run_child`: SIGKILL when the parent dies (however it dies)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # Linux; elsewhere the check below remains
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
