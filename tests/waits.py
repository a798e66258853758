"""Waiting on a state, not a time: a test waits until what it needs has happened, failing only if it never does."""

import time


def wait_for(condition, seconds: float = 60, what: str = "") -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)
