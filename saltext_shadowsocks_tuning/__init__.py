"""Salt loader entry point: after `pip install .` the Salt loader finds the
flat `_modules` and `_states` files shipped inside this package, so
`salt-call --local shadowsocks_tuning.get net.core.somaxconn` works with no
file_roots and no sync. The engines they import (`_utils/sstuning_*.py`)
ship here too: Salt's utils loader takes no extension directories, so the
execution module finds them through `utils_dir()`."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def loader_dirs():
    """Directories per Salt loader type (the dict form of a `salt.loader` entry point)."""
    return {
        "modules": [os.path.join(_HERE, "_modules")],
        "states": [os.path.join(_HERE, "_states")],
    }


def utils_dir():
    """The directory of the flat engine files (`sstuning_*.py`) of this install."""
    return os.path.join(_HERE, "_utils")
