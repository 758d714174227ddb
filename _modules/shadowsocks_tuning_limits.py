"""
Open-file limits of the shadowsocks daemons: the files that set them
(``/etc/default/supervisor``, ``supervisord.conf``, init scripts, systemd
drop-ins), the stop and start that makes a daemon take them, and the
``/proc/<pid>/limits`` of what runs. Functions of the ``shadowsocks_tuning``
execution module, like those of ``_modules/shadowsocks_tuning.py`` (kernel
sysctls): Salt's loader files both under one name. Options and pillar are
read once per call through ``sstuning_engines``; a problem anywhere in pillar
``shadowsocks:tuning`` fails every function that acts, before anything is
written.
"""

import contextlib
import os
import sys

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"


# The engines, found as shadowsocks_tuning.py finds them (synced utils on
# sys.path while Salt imports this file; else the pip package's copy).
try:
    import sstuning_engines as engines
except ImportError:
    try:
        from saltext_shadowsocks_tuning._utils import sstuning_engines as engines
    except ImportError:
        engines = None
_ENGINES = engines.load() if engines else None


if _ENGINES:
    settings_mod = _ENGINES["sstuning_settings"]
    procfs = _ENGINES["sstuning_procfs"]
    journal = _ENGINES["sstuning_journal"]
    limits_engine = _ENGINES["sstuning_limits"]


def __virtual__():
    if _ENGINES and sys.platform.startswith("linux"):
        return __virtualname__
    return (False, "shadowsocks_tuning (open-file limits): needs Linux (/proc) and the engines "
                   "(_utils/sstuning_*.py); run saltutil.sync_all (file_roots) or reinstall the package (pip)")


def _options():
    return settings_mod.options(__opts__.get)


def _resolve(arguments=None):
    """(settings, options): pillar shadowsocks:tuning and ``arguments``, validated whole."""
    return engines.resolve(__opts__.get, globals().get("__pillar__", {}), arguments)


def validate_nofile(nofile):
    """
    Check an open-file limit and return it as an integer: a positive whole
    number no higher than ``fs.nr_open``, the kernel's ceiling for any
    process's RLIMIT_NOFILE.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.validate_nofile 51200
    """
    return settings_mod.validate_nofile(nofile, procfs.nr_open(_options()["proc_root"]))


def nofile_check(nofile=None, limits=None):
    """
    Validate the whole tuning before anything is written: every pillar key of
    both halves, N (a positive integer, at most ``fs.nr_open``), every path,
    service and unit name, the content of every file to edit (an init script
    that is not a shell script, a ``ulimit`` line too complex to rewrite, a
    supervisord config without ``[supervisord]``), missing init scripts, and
    whether this process can grant N at all to the services it restarts.
    Returns ``{"ok", "nofile", "init_system", "grantable", "manage",
    "skipped", "errors", "notes", "verify"}`` (``verify``: the pidfiles and
    wait of pillar ``limits:verify``); writes nothing.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_check
        salt-call shadowsocks_tuning.nofile_check 16384 '{init_scripts: [/etc/init.d/shadowsocks]}'
    """
    try:
        resolved, opts = _resolve({"nofile": nofile, "limits": limits})
    except SaltInvocationError as exc:
        return {"ok": False, "nofile": None, "init_system": None, "grantable": None, "manage": [], "skipped": [],
                "errors": [str(exc)], "notes": [], "verify": None}
    prepared = engines.prepare(resolved, opts, test=True)
    planned, errors = prepared["limits"], prepared["errors"]
    notes = ["not installed, left alone: " + ", ".join(planned["skipped"])] if planned["skipped"] else []
    return {
        "ok": not errors,
        "nofile": resolved["nofile"],
        "init_system": resolved["init_system"],
        "grantable": limits_engine.grantable(opts["proc_root"])["limit"],
        "manage": planned["manage"],
        "skipped": planned["skipped"],
        "errors": errors,
        "notes": notes,
        "verify": resolved["verify"],
    }


def nofile_apply(part=None, test=False):
    """
    Put the open-file limit (pillar ``shadowsocks:tuning:nofile``) in every
    file of one part of pillar ``shadowsocks:tuning:limits`` (``supervisor``,
    ``shadowsocks_libev``, ``init_scripts``, ``units``; all when omitted),
    then stop and start each service whose file changed. Nothing is written
    when any part of the pillar is invalid or a named file is missing.
    Returns ``{"files": [...], "restarts": [...], "errors": [...]}``:
    ``errors`` names each service that did not come back.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_apply supervisor test=True
        salt-call shadowsocks_tuning.nofile_apply
    """
    parts = settings_mod.LIMITS_PARTS if part is None else [
        settings_mod.validate_choice(part, settings_mod.LIMITS_PARTS, "part")]
    resolved, opts = _resolve()
    # A dry run takes no lock: it must not even create state_dir.
    with contextlib.nullcontext() if test else journal.lock(opts["state_dir"]):
        # The kernel half is planned as a dry run here: this call loads no module.
        prepared = engines.prepare(resolved, opts, test=True)
        if prepared["errors"]:
            engines.fail(prepared["errors"])
        planned = prepared["limits"]
        files, restarts, failed = [], [], []
        for name in parts:
            try:
                done = limits_engine.apply_part(resolved, opts, planned["parts"][name], bool(test))
            except CommandExecutionError as exc:  # a file could not be written
                written = [item["path"] for item in limits_engine.written(planned["parts"][name])]
                raise CommandExecutionError(f"{exc} (written before that: {', '.join(written) or 'nothing'})")
            files.extend(done[0])
            restarts.extend(done[1])
            failed.extend(done[2])
    for item in files:
        item.pop("text", None)
    return {"nofile": resolved["nofile"], "files": files, "restarts": restarts, "errors": failed}


def _one_file(target, nofile, test, force):
    """Plan one file and, unless ``test``, write it under the lock."""
    opts = _options()
    if target["kind"] != "assignment":  # a KEY=value line takes any plain value
        nofile = settings_mod.validate_nofile(nofile, procfs.nr_open(opts["proc_root"]))
    planned = limits_engine.plan_file(opts, target, nofile, bool(force))
    if planned["changed"] and not test:
        with journal.lock(opts["state_dir"]):
            limits_engine.write_file(opts, planned)
    planned.pop("text", None)
    return planned


def set_ulimit(path, nofile, placement="end", test=False, if_missing="fail", force=False):
    """
    Give a shell file exactly one active ``ulimit -n <nofile>`` line: an
    existing ``ulimit -n`` line is rewritten in place, never duplicated, and
    every other line (comments, CRLF endings, a missing final newline) stays
    byte for byte. ``placement=end`` appends a new line (a file sourced by an
    init script, such as ``/etc/default/supervisor``); ``placement=init`` puts
    it right after the LSB header, before the script starts anything.
    ``if_missing``: ``fail`` or ``skip``. An existing higher limit is kept
    unless ``force=True``. Returns what changed, with a diff.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_ulimit /etc/default/supervisor 51200 test=True
        salt-call shadowsocks_tuning.set_ulimit /etc/init.d/shadowsocks 51200 placement=init
    """
    target = {"kind": "ulimit", "path": settings_mod.validate_path(path, "path"),
              "placement": settings_mod.validate_choice(placement, ("end", "init"), "placement"),
              "required": settings_mod.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
    return _one_file(target, nofile, test, force)


def set_assignment(path, key, value, test=False, if_missing="fail", force=False):
    """
    Give a shell-sourced defaults file exactly one active ``KEY=value`` line,
    e.g. ``MAXFD=51200`` in ``/etc/default/shadowsocks-libev`` (its init
    script runs ``ulimit -n ${MAXFD}``). Quotes and a trailing comment of the
    existing line are kept; other lines stay byte for byte. A higher number
    already there is kept unless ``force=True``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_assignment /etc/default/shadowsocks-libev MAXFD 51200
    """
    lines = _ENGINES["sstuning_lines"]
    if not isinstance(key, str) or not lines.ENV_KEY.match(key):
        raise SaltInvocationError(f"key: {key!r} is not a shell variable name such as MAXFD")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not lines.ENV_VALUE.match(str(value)):
        raise SaltInvocationError(
            f"{key}: {value!r} is not a plain value (letters, digits and ./:@%+,=- only; nothing a shell would expand)"
        )
    target = {"kind": "assignment", "path": settings_mod.validate_path(path, "path"), "key": key,
              "required": settings_mod.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
    return _one_file(target, str(value), test, force)


def set_minfds(path, nofile, test=False, if_missing="fail", force=False):
    """
    Set ``minfds=<nofile>`` in the ``[supervisord]`` section of supervisord's
    configuration, so supervisord raises its own limit (and its programs') even
    where it is started without ``/etc/default/supervisor``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_minfds /etc/supervisor/supervisord.conf 51200 test=True
    """
    target = {"kind": "minfds", "path": settings_mod.validate_path(path, "path"),
              "required": settings_mod.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
    return _one_file(target, nofile, test, force)


def dropin_path(unit):
    """
    The drop-in file that carries ``LimitNOFILE`` for a unit; for a template
    unit (``name@.service``) it applies to every instance.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.dropin_path shadowsocks-libev-server@.service
    """
    return limits_engine.dropin_path(_options(), settings_mod.validate_unit(unit, "unit"))


def set_systemd_nofile(unit, nofile, test=False, if_missing="fail"):
    """
    Write a systemd drop-in with ``LimitNOFILE=<nofile>`` for a service unit
    (template units such as ``shadowsocks-libev-server@.service`` included).
    Run ``daemon-reload`` and restart the unit afterwards (``stop_start``).
    ``if_missing`` applies to the unit: ``skip`` leaves units that are not
    installed alone.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_systemd_nofile supervisor.service 51200 test=True
    """
    unit = settings_mod.validate_unit(unit, "unit")
    if_missing = settings_mod.validate_choice(if_missing, ("fail", "skip"), "if_missing")
    opts = _options()
    if if_missing == "fail" and limits_engine.unit_file(opts, unit) is None:
        raise CommandExecutionError(
            f"{unit}: no unit file in {', '.join(opts['unit_dirs'])}; install it, or remove it from pillar "
            f"{settings_mod.LIMITS}"
        )
    return _one_file({"kind": "dropin", "path": None, "unit": unit}, nofile, test, False)


def init_system(prefer="auto"):
    """
    Which service manager to go through: ``systemd`` when it is PID 1
    (``/run/systemd/system`` exists, as sd_booted(3) checks), else
    ``sysvinit`` (``service NAME stop|start`` and /etc/init.d scripts).
    ``prefer`` forces one.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.init_system
    """
    settings_mod.validate_choice(prefer, settings_mod.INIT_SYSTEMS, "prefer")
    if prefer != "auto":
        return prefer
    return "systemd" if os.path.isdir(_options()["systemd_marker"]) else "sysvinit"


def nofile_grantable():
    """
    The highest open-file limit a service started from this process can get:
    ``fs.nr_open`` with CAP_SYS_RESOURCE, else this process's own hard limit
    (``ulimit -n N`` above it fails with "Operation not permitted").

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_grantable
    """
    return limits_engine.grantable(_options()["proc_root"])


def nofile(wanted=None, names=None, pidfiles=None, wait=0):
    """
    Report the open-file limits of supervisord and every shadowsocks process
    (``ss-server``, ``ss-local``, ``ss-manager``, ``ss-redir``, ``ssserver``,
    ``sslocal``, ...): soft and hard from ``/proc/<pid>/limits`` against the
    wanted N (pillar ``shadowsocks:tuning:nofile``, else 51200), and for a
    process below N the reason when it can be told (a parent's hard limit
    without CAP_SYS_RESOURCE, ``fs.nr_open``, or a process started before the
    limit was configured). Plugins (``obfs-server``, ``v2ray-plugin``, or any
    child of a shadowsocks process) and the servers ``ss-manager`` starts are
    checked too. ``pidfiles`` limits the report to the process trees of those
    daemons (the servers an ``ss-manager`` started belong to its tree);
    ``wait`` seconds gives restarted daemons time to come up.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile
        salt-call shadowsocks_tuning.nofile 16384 pidfiles='[/var/run/supervisord.pid]'
    """
    resolved, opts = _resolve({"nofile": wanted})
    if isinstance(pidfiles, str):
        pidfiles = [pidfiles]
    if pidfiles is not None and not isinstance(pidfiles, list):
        raise SaltInvocationError(f"pidfiles: {pidfiles!r} must be a list of pidfile paths")
    pidfiles = [settings_mod.validate_path(p, "pidfiles") for p in (pidfiles or [])]
    wait = settings_mod.validate_seconds(wait, "wait", 0, 600)
    return limits_engine.watch(opts["proc_root"], resolved["nofile"], limits_engine.process_names(names),
                               pidfiles, wait)


def stop_start(name, pidfile=None, when=None, init=None, timeout=None, grace=None, test=False):
    """
    Stop a service, wait until it is really gone, then start it, so that it
    comes back with the open-file limit now configured. Never the init
    script's ``restart``: Debian 12's ``/etc/init.d/supervisor restart`` only
    stops supervisord. Under systemd: ``daemon-reload`` then ``restart``
    (``try-restart`` for template units, by pattern).

    name
        The service (sysvinit: ``/etc/init.d/NAME``) or unit (systemd).
    pidfile
        The daemon's pidfile: tells whether it runs and when it is gone more
        reliably than an init script's ``status``.
    when
        ``running`` (default: only a running service), ``always`` (start it
        even if it was stopped), ``never``.
    init
        ``auto``, ``systemd`` or ``sysvinit`` (see ``init_system``).
    timeout
        Seconds for the stop and for the start.
    grace
        Seconds the daemon must stay up after it started: one that dies at
        once (a crash loop) fails, named. ``0`` skips the check.

    Left out, ``when``, ``init``, ``timeout`` and ``grace`` come from pillar
    ``shadowsocks:tuning:limits`` (``restart``, ``init_system``, ``timeout``, ``grace``).
    The comment says how many live TCP connections the stop cuts (counted
    from the sockets of the daemon and its children).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.stop_start supervisor pidfile=/var/run/supervisord.pid test=True
    """
    resolved, opts = _resolve()
    when = settings_mod.validate_choice(when or resolved["restart"], settings_mod.RESTART_WHEN, "when")
    timeout = settings_mod.validate_seconds(timeout or resolved["timeout"], "timeout")
    grace = settings_mod.validate_grace(resolved["grace"] if grace is None else grace, "grace")
    if pidfile is not None:
        pidfile = settings_mod.validate_path(pidfile, "pidfile")
    system = init_system(init) if init else resolved["init_system"]
    name = settings_mod.validate_unit(name, "name") if system == "systemd" else settings_mod.validate_service(name, "name")
    return limits_engine.restart(opts, name, pidfile, when, system, timeout, grace, bool(test))
