"""
What the two Salt execution modules (``_modules/shadowsocks_tuning.py``,
kernel sysctls; ``_modules/shadowsocks_tuning_limits.py``, open-file limits
and services) share: the engines, imported from the directory this file is
in; minion options and pillar ``shadowsocks:tuning`` turned into settings,
once per call; and the rule that both halves are planned before either
writes anything.
"""

import importlib
import os
import sys

from salt.exceptions import CommandExecutionError

# The engines, flat files next to this one (dependencies first). Their names
# share the global sys.modules with everything else, hence the prefix.
NAMES = (
    "sstuning_catalogue", "sstuning_settings", "sstuning_procfs", "sstuning_journal", "sstuning_sysctld",
    "sstuning_shell", "sstuning_shellforms", "sstuning_lines", "sstuning_ports", "sstuning_services", "sstuning_sysctl",
    "sstuning_limits", "sstuning_container", "sstuning_diagnose",
)
_HERE = os.path.dirname(os.path.abspath(__file__))


def _stamp(path):
    return (path, os.stat(path).st_mtime_ns)


_OWN_STAMP = _stamp(os.path.abspath(__file__))


def load():
    """``{name: module}`` of every engine, or None when a file is missing. A
    long-running minion keeps its first import of a module after
    ``saltutil.sync_all``: when any file changed or moved (this one too),
    all of them are imported again, so no stale engine stays."""
    try:
        if _stamp(os.path.abspath(__file__)) != _OWN_STAMP:
            return importlib.reload(sys.modules[__name__]).load()
        stamps = {name: _stamp(os.path.join(_HERE, f"{name}.py")) for name in NAMES}
    except OSError:
        return None
    if not all(getattr(sys.modules.get(name), "__sstuning_stamp__", None) == stamps[name] for name in NAMES):
        for name in NAMES:
            sys.modules.pop(name, None)
        sys.path.insert(0, _HERE)
        try:
            for name in NAMES:
                importlib.import_module(name).__sstuning_stamp__ = stamps[name]
        finally:
            sys.path.remove(_HERE)
    return {name: sys.modules[name] for name in NAMES}


# The functions below look the engines up in sys.modules when called: load()
# may have replaced them since this file was imported.
def resolve(opts_get, pillar, arguments=None):
    """(settings, options): the minion options ``shadowsocks_tuning.*`` read
    once through ``opts_get`` (``__opts__.get``), and pillar
    ``shadowsocks:tuning`` with ``arguments`` resolved and validated whole."""
    settings_mod, procfs = sys.modules["sstuning_settings"], sys.modules["sstuning_procfs"]
    opts = settings_mod.options(opts_get)
    settings = settings_mod.resolve(
        settings_mod.pillar_tuning(pillar), arguments,
        nr_open=procfs.nr_open(opts["proc_root"]), systemd=os.path.isdir(opts["systemd_marker"]),
    )
    return settings, opts


def prepare(settings, opts, test):
    """Plan both halves and collect every problem, so that a typo or a
    missing target in one half stops the other too: ``{"sysctls",
    "limits", "originals", "errors"}`` (``originals``: the validated record
    of saved originals, None when it is broken)."""
    sysctl_engine, limits_engine = sys.modules["sstuning_sysctl"], sys.modules["sstuning_limits"]
    journal = sys.modules["sstuning_journal"]
    sysctls = sysctl_engine.prepare(settings, opts, test)
    limits = limits_engine.plan(settings, opts)
    errors = sysctls["errors"] + limits["errors"]
    try:
        originals = journal.load_originals(opts["state_dir"])  # a broken record would stop the first write
    except CommandExecutionError as exc:
        originals = None
        errors.append(str(exc))
    return {"sysctls": sysctls, "limits": limits, "originals": originals, "errors": errors}


def fail(errors):
    """Stop a call that acts: every problem ``prepare`` found, and that nothing was written."""
    raise CommandExecutionError("\n".join(errors) + "\nNothing was changed")
