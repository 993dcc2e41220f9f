"""r1v_quant.util.signals: Ctrl-C around child processes, including the race that let a child outlive its
run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from r1v_quant.util import signals


def test_ctrl_c_landing_while_the_child_starts_still_kills_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The main thread blocks SIGINT around Popen, but a process-wide SIGINT can be taken by another
    # thread (tqdm's, torch's); Python then raises KeyboardInterrupt in the main thread wherever it is.
    # Here it lands after the child exists and before Popen returns: the child must still be killed.
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []
    go, sent = threading.Event(), threading.Event()

    def send_when_told() -> None:  # started before run_child, so SIGINT is not blocked in this thread
        go.wait(30)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    sender = threading.Thread(target=send_when_told)
    sender.start()

    def popen_with_a_ctrl_c(*args: object, **kwargs: object) -> subprocess.Popen:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        go.set()
        sent.wait(30)
        for _ in range(50):  # bytecodes run here: an unprotected Popen would raise in this loop
            time.sleep(0.01)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen_with_a_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            signals.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
        sender.join()
        assert started and started[0].poll() is not None, "the child outlived the interrupted run"
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_child_exit_status_is_returned_and_sigint_is_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    assert signals.run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_ctrl_c_during_the_wait_kills_the_child() -> None:
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        signals.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
    assert time.monotonic() - t0 < 30
    timer.join()
