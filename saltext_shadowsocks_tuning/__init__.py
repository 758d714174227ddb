"""Salt loader entry point: after `pip install` (or `salt-pip install`) the
Salt loader finds the flat `_modules`, `_states` and `_beacons` files shipped
inside this package, so `salt-call --local shadowsocks_tuning.get
net.core.somaxconn` works with no file_roots and no sync. The engines they
import (`_utils/sstuning_*.py`) ship here too: Salt's utils loader takes no
extension directories, so the execution module finds them through
`loader_dirs()`, which puts their directory on `sys.path`. The SLS tree and `pillar.example` ship here as well
(`file_roots` and `pillar.example`: links to the repository's `salt/` and
`pillar.example` in a checkout, copies in a wheel):
`python -m saltext_shadowsocks_tuning file-roots` prints the directory to
add to `file_roots` for `state.apply shadowsocks.tuning`."""

import os
import sys

from saltext_shadowsocks_tuning.version import __version__  # noqa: F401

_HERE = os.path.dirname(os.path.abspath(__file__))


def loader_dirs():
    """Directories per Salt loader type (the dict form of a `salt.loader` entry point).
    Salt calls it before it imports any module of this package: it also puts
    the flat engine files on `sys.path` (at the end, so that engines a
    file_roots sync shipped, which Salt's loader puts first, win), where the
    Salt modules import them by name (`import sstuning_limits`)."""
    if utils_dir() not in sys.path:
        sys.path.append(utils_dir())
    return {
        "modules": [os.path.join(_HERE, "_modules")],
        "states": [os.path.join(_HERE, "_states")],
        "beacons": [os.path.join(_HERE, "_beacons")],
    }


def utils_dir():
    """The directory of the flat engine files (`sstuning_*.py`) of this install."""
    return os.path.join(_HERE, "_utils")


def file_roots_dir():
    """The directory to add to `file_roots`: it holds `shadowsocks/tuning/*.sls`."""
    return os.path.join(_HERE, "file_roots")


def pillar_example():
    """The installed `pillar.example` (every pillar key, with its default)."""
    return os.path.join(_HERE, "pillar.example")
