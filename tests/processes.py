"""Helpers for tests that start processes: a free loopback port, and killing what still runs when a test ends."""

import socket
import subprocess

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill (and reap) every process still running: one hung in a collective, or left by a failed test."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until_serving(process: subprocess.Popen) -> None:
    """Read a `mistral-jax serve` process's stderr (text) until it says where it listens; fail with what it said."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if " on http://" in line:
            return
    pytest.fail("the server did not start:\n" + "".join(lines))
