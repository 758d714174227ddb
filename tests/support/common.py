"""Helpers shared by test modules. They live here, not in conftest.py:
tests/conftest.py and tests/integration/conftest.py are both module `conftest`,
so `from conftest import ...` would pick whichever pytest loaded last."""

import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def in_netns(name, *argv, **kwargs):
    """Run a command inside a network namespace made by the `netns` fixture."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, **kwargs)


def read_in_netns(name, key):
    return in_netns(name, "cat", "/proc/sys/" + key.replace(".", "/"), check=True).stdout.split()
