"""Killing a real writer process (SIGKILL) while a write is provably in progress."""
import os
import signal
import time


def kill_while_growing(child, paths, timeout=120.0):
    """SIGKILL ``child`` once one of ``paths()`` (the files or directories it may be writing
    now) grows between two looks 2 ms apart: a write is in progress. Asserts that one did
    and that the child died of the signal."""
    def size(path):
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        return os.path.getsize(path)

    try:
        deadline = time.monotonic() + timeout
        caught = False
        while time.monotonic() < deadline and not caught:
            assert child.poll() is None, "the writer died"
            for path in paths():
                try:
                    before = size(path)
                    time.sleep(0.002)
                    caught = 0 < before < size(path)
                except FileNotFoundError:  # that write just finished
                    continue
                if caught:
                    break
        assert caught, "never saw a write in progress"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
