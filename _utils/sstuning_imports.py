"""
Engines that stay fresh in a long-running minion.

The engines are flat files (``_utils/sstuning_*.py``) imported by their own
names, ``import sstuning_limits as limits``, from wherever this install put
them: the synced ``extmods/utils`` (file_roots + ``saltutil.sync_all``; Salt's
loader puts it on ``sys.path`` while it imports a Salt module), the files
salt-ssh shipped (the same), or a pip install's package directory (its entry
point puts that on ``sys.path``).

Salt's loader executes the Salt modules again after ``saltutil.sync_all``,
but Python keeps the first import of each engine (``sys.modules`` is one
table per process), so a re-executed module would go on calling the engines
it imported before the sync. Every Salt module therefore imports the engines
inside ``with fresh():``. On entry, when any ``sstuning_*`` file changed,
moved or vanished since this process imported it, every ``sstuning_*``
module is forgotten, so the plain imports inside the block load the files as
they are now; on exit each one is stamped with its file's identity.
"""

import contextlib
import os
import sys

PREFIX = "sstuning_"
_STAMP = "__sstuning_stamp__"


def _stamp(module):
    """The identity of the file a module was loaded from, or None when it is gone."""
    try:
        info = os.stat(module.__file__)
    except (OSError, TypeError, AttributeError):
        return None
    return (module.__file__, info.st_ino, info.st_mtime_ns, info.st_size)


def _engines():
    return [module for name, module in list(sys.modules.items()) if name.startswith(PREFIX) and module]


@contextlib.contextmanager
def fresh():
    """Import engines inside this block: stale ones are forgotten first."""
    engines = _engines()
    # A module imported outside such a block (a test, a benchmark) has no
    # stamp yet: it is taken as it is and stamped on exit.
    if any(getattr(m, _STAMP, None) is not None and getattr(m, _STAMP) != _stamp(m) for m in engines):
        for name in [name for name in sys.modules if name.startswith(PREFIX)]:
            del sys.modules[name]
    yield
    for module in _engines():
        if getattr(module, _STAMP, None) is None:
            setattr(module, _STAMP, _stamp(module))
