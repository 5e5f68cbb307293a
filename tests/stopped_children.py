"""Child processes that stop themselves (SIGSTOP) at a chosen point, for a test to kill -9 there.

A child that stops itself lands the kill at that point on every machine,
however slow, without the test guessing how long anything takes: the test
waits until waitpid reports the child stopped, then sends SIGKILL.
"""

import os
import signal
import time

# Not shorter by default: a multi-worker peer killed within ~50 ms of its stop leaves the
# survivor a "Socket closed" error instead of the missed-heartbeat one that
# test_faults_multiworker.py expects (seen twice in two runs at a 0.05 s poll).
POLL_SECONDS = 0.2


def wait_stopped(proc, deadline, poll=POLL_SECONDS):
    """True once `proc` (a `subprocess.Popen`) has stopped itself; False if it ended first or at `deadline`.

    A child that ended has its `returncode` set (this wait reaped it). `poll`: seconds between looks.
    """
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return True
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return False
        time.sleep(poll)  # polling a state change, with a deadline
    return False


def kill_when_stopped(proc, deadline, where, output):
    """Waits until `proc` stopped itself at `where`, then kills it with SIGKILL and reaps it.

    Args:
        proc: the child (`subprocess.Popen`).
        deadline: `time.monotonic()` value after which the wait fails.
        where: the point it stops at, for the failure message.
        output: a function returning the text to show when it never stopped.

    Raises:
        AssertionError: it ended, or did not stop by `deadline`; it is killed either way.
    """
    stopped = wait_stopped(proc, deadline)
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert stopped, f"the child did not reach {where} (exit status {proc.returncode}):\n{output()[-4000:]}"
    assert proc.returncode == -signal.SIGKILL


def reap(procs):
    """Kills every child still running and waits for each (a test's `finally`)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
