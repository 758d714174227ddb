"""
Open-file limits of the daemons shadowsocks runs as (the kinds of daemon of
``sstuning_daemons``): the files that set them for the next start
(``/etc/default/supervisor``, ``supervisord.conf``, ``MAXFD=``, init
scripts, systemd drop-ins), raising running daemons in place, the stop and
start where that cannot reach the limit, and the ``/proc/<pid>/limits`` of
what runs. Functions of the ``shadowsocks_tuning`` execution module, like
those of ``_modules/shadowsocks_tuning.py`` (kernel sysctls): Salt's loader
files both under one name. Options and pillar are read once per call into
one plan (``sstuning_plan``); a problem anywhere in pillar
``shadowsocks:tuning`` fails every function that acts, before anything is
written.
"""

import contextlib
import os
import sys

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"

# The engines, imported as shadowsocks_tuning.py imports them (see there).
try:
    from sstuning_imports import fresh

    with fresh():
        import sstuning_journal
        import sstuning_limits
        import sstuning_lines
        import sstuning_plan
        import sstuning_procfs
        import sstuning_services
        import sstuning_settings
        import sstuning_units
    _MISSING = None
except ImportError as exc:
    _MISSING = str(exc)


def __virtual__():
    if not _MISSING and sys.platform.startswith("linux"):
        return __virtualname__
    return (False, "shadowsocks_tuning (open-file limits): needs Linux (/proc) and the engines "
                   f"(_utils/sstuning_*.py: {_MISSING}); run saltutil.sync_all (file_roots) or reinstall the package (pip)")


def _options():
    return sstuning_plan.options(__opts__.get)


def _plan(arguments=None, test=True, plan=None):
    """The plan a state passed in, or a new one of pillar and ``arguments``."""
    if plan is not None:
        if not isinstance(plan, sstuning_plan.Plan):
            raise SaltInvocationError("plan: leave it out: a plan is made by this package's own states")
        return plan
    return sstuning_plan.make(_options(), globals().get("__pillar__", {}), arguments, test)


def _settings(arguments=None):
    """(settings, options): pillar shadowsocks:tuning and ``arguments``, validated whole."""
    options = _options()
    return sstuning_plan.resolve(options, globals().get("__pillar__", {}), arguments), options


def validate_nofile(nofile):
    """
    Check an open-file limit and return it as an integer: a positive whole
    number no higher than ``fs.nr_open``, the kernel's ceiling for any
    process's RLIMIT_NOFILE.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.validate_nofile 51200
    """
    return sstuning_settings.validate_nofile(nofile, sstuning_procfs.nr_open(_options()["proc_root"]))


def nofile_check(nofile=None, limits=None, plan=None):  # pylint: disable=redefined-outer-name
    """
    Validate the whole tuning before anything is written: every pillar key of
    both halves, N (a positive integer, at most ``fs.nr_open``, at most what
    this box can grant), every path, service and unit name, the content of
    every file to edit (a shell file that does not parse or sets the limit in
    a form that cannot be edited safely, a supervisord config without
    ``[supervisord]``), missing init scripts, and what would happen to every
    running daemon. Returns ``{"ok", "nofile", "init_system", "grantable",
    "manage", "skipped", "processes", "errors", "notes", "verify"}``;
    writes nothing.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_check
        salt-call shadowsocks_tuning.nofile_check 16384 '{init_scripts: [/etc/init.d/shadowsocks]}'
    """
    planned = _plan({"nofile": nofile, "limits": limits}, True, plan)
    if planned.settings is None:
        return {"ok": False, "nofile": None, "init_system": None, "grantable": None, "manage": [], "skipped": [],
                "processes": [], "errors": planned.errors, "notes": [], "verify": None}
    half = planned.limits
    notes = list(planned.settings["notes"])
    if half["skipped"]:
        notes.append("not installed, left alone: " + ", ".join(half["skipped"]))
    return {
        "ok": not planned.errors,
        "nofile": planned.settings["nofile"],
        "init_system": planned.settings["limits"]["init_system"],
        "grantable": half["grantable"]["limit"],
        "manage": half["manage"],
        "skipped": half["skipped"],
        "processes": [{k: p[k] for k in ("pid", "name", "kind", "soft", "hard", "action", "why")}
                      for p in half["processes"].values()],
        "errors": planned.errors,
        "notes": notes,
        "verify": planned.settings["limits"]["verify"],
    }


def nofile_apply(part=None, test=False, plan=None):  # pylint: disable=redefined-outer-name
    """
    Put the open-file limit (pillar ``shadowsocks:tuning:nofile``) where each
    kind of daemon reads it, for one part of pillar
    ``shadowsocks:tuning:limits`` (a kind of daemon such as ``supervisor``
    or ``shadowsocks_libev``, or ``init_scripts``, ``units``; all when
    omitted): running daemons are raised in place first (``restart: live``,
    the default; no connection is cut), then the files for the next start
    are written, then the services that could not be raised in place are
    stopped and started. A service an earlier run stopped and did not start
    again is started first. Nothing is written when any part of the pillar
    is invalid or a named file is missing. Returns ``{"nofile", "files",
    "raised", "restarts", "processes", "errors", "notes"}``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_apply supervisor test=True
        salt-call shadowsocks_tuning.nofile_apply
    """
    planned = _plan(None, bool(test), plan)
    test = bool(test)
    with contextlib.nullcontext() if test else sstuning_journal.lock(planned.options["state_dir"]):
        # A dry run takes no lock: it must not even create state_dir. Under
        # the lock a plan that a write of this run spent, or that another
        # run's writes made stale, is made again.
        if not test and (planned.test or planned.stale()
                         or not all(planned.fresh_for(f"limits:{n}") for n in _parts(planned, part))):
            sstuning_plan.remake(planned, globals().get("__pillar__", {}))
        if planned.errors:
            sstuning_plan.fail(planned)
        settings, options, half = planned.settings, planned.options, planned.limits
        names = _parts(planned, part)
        limits = settings["limits"]
        out = {"nofile": settings["nofile"], "files": [], "raised": [], "restarts": [], "processes": [],
               "errors": [], "notes": list(settings["notes"]) + half["notes"]}
        skipped = [item["path"] for n in names for group in half["parts"][n] for item in group["files"]
                   if item["skipped"]]
        if skipped:
            out["notes"].append("not installed, left alone: " + ", ".join(skipped))
        if planned.pending and (part is None or part == names[0]):
            out["restarts"].extend(sstuning_services.finish(options, planned.pending, limits["timeout"],
                                                            limits["grace"], test))
        if not test:
            sstuning_plan.remember_limits(planned, part)
        for name in names:
            try:
                done = sstuning_limits.apply(settings, options, half, name, test)
            except CommandExecutionError as exc:  # a file could not be written
                wrote = [item["path"] for item in sstuning_limits.written(half["parts"][name])]
                raise CommandExecutionError(
                    f"{exc} (written before that: {', '.join(wrote) or 'nothing'}; their originals are on "
                    "record: state.apply shadowsocks.tuning.clean puts them back)")
            except BaseException:
                planned.written(f"limits:{name}", processes=True)
                raise
            if not test and (any(item.get("written") for item in done["files"])
                             or any(r["changed"] for r in done["raised"] + done["restarts"])):
                # What it read of that part is stale now; a restart changed the processes too.
                planned.written(f"limits:{name}", processes=any(r["changed"] for r in done["restarts"]))
            for key in ("files", "raised", "restarts", "errors"):
                out[key].extend(done[key])
        out["processes"] = [_process_line(p) for p in half["processes"].values()
                            if (p["member"] and p["member"][0] in names) or (not p["member"] and p["kind"] in names)]
    for item in out["files"]:
        item.pop("text", None)
    return out


def _parts(planned, part):
    known = list(planned.settings["limits"]["parts"]) if planned.settings else []
    if part is None:
        return known
    if part not in known:
        raise SaltInvocationError(f"part: {part!r} must be one of {', '.join(known)} (or left out for all)")
    return [part]


def _process_line(proc):
    label = f"{proc['name']} (pid {proc['pid']}) {proc['soft']}:{proc['hard']}"
    if proc["action"] == "in place":
        return {"pid": proc["pid"], "action": "in place", "comment": f"{label}: at the limit already"}
    if proc["action"] == "left":
        why = proc["why"] or "its limit changes with its next start (restart policy)"
        return {"pid": proc["pid"], "action": "left", "comment": f"{label}: left: {why}"}
    if proc["action"] == "restart":
        return {"pid": proc["pid"], "action": "restart", "comment": f"{label}: {proc['why']}: its service restarts"}
    return {"pid": proc["pid"], "action": proc["action"], "comment": f"{label}: raised in place"}


def raise_live(nofile=None, pidfiles=None, names=None, test=False):
    """
    Raise the open-file limit of running daemons in place, now, without a
    restart and without cutting a connection (``prlimit(2)``): soft and hard
    to at least ``nofile`` (pillar ``shadowsocks:tuning:nofile`` when
    omitted), never lowering a field, read back from ``/proc/PID/limits``.
    Without CAP_SYS_RESOURCE only soft limits can rise, up to the hard
    limit, and only of processes of salt's own user; those that cannot be
    raised are named with the reason. ``pidfiles`` limits it to those
    daemons' process trees (default: every process of the managed kinds);
    ``names`` to those process names. Files are not touched: the next start
    still needs ``state.apply shadowsocks.tuning``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.raise_live test=True
        salt-call shadowsocks_tuning.raise_live 16384 pidfiles='[/var/run/supervisord.pid]'
    """
    resolved, options = _settings({"nofile": nofile})
    pidfiles = _pidfiles(pidfiles)
    kinds = sstuning_limits.serving(options, resolved["limits"]["kinds"])
    table = sstuning_procfs.process_table()
    found = sstuning_limits.processes(table, kinds)
    if names is not None:
        wanted = sstuning_limits.process_names(names, kinds)
        found = {pid: p for pid, p in found.items() if p["name"] in wanted}
    if pidfiles:
        scope = sstuning_procfs.subtree(table, [p for p in map(sstuning_procfs.pid_from, pidfiles) if p])
        found = {pid: p for pid, p in found.items() if pid in scope}
    cap = sstuning_procfs.has_cap_sys_resource("self")
    for pid, proc in found.items():
        proc.update(sstuning_limits.decide_process(proc, resolved["nofile"], cap,
                                                   sstuning_procfs.may_set_limits(pid, cap), "live", ("by hand", 0)))
    raised = sstuning_limits.raise_live(list(found.values()), bool(test))
    refused = [f"{p['name']} (pid {p['pid']}) {p['soft']}:{p['hard']}: {p['why']}" for p in found.values()
               if p["action"] == "restart"]
    return {"nofile": resolved["nofile"], "raised": raised, "refused": refused,
            "ok": not refused and all(r["ok"] for r in raised),
            "in_place": [f"{p['name']} (pid {p['pid']})" for p in found.values() if p["action"] == "in place"]}


def _pidfiles(pidfiles):
    if isinstance(pidfiles, str):
        pidfiles = [pidfiles]
    if pidfiles is not None and not isinstance(pidfiles, list):
        raise SaltInvocationError(f"pidfiles: {pidfiles!r} must be a list of pidfile paths")
    return [sstuning_settings.validate_path(p, "pidfiles") for p in (pidfiles or [])]


def _one_file(target, nofile, test, force):
    """Plan one file and, unless ``test``, write it under the lock."""
    options = _options()
    nr_open = sstuning_procfs.nr_open(options["proc_root"])
    if target["kind"] != "assignment":  # a KEY=value line takes any plain value
        nofile = sstuning_settings.validate_nofile(nofile, nr_open)
    ceiling = nr_open if target["kind"] == "assignment" and not str(nofile).isdigit() else \
        sstuning_limits.grantable(options["proc_root"])["limit"]
    planned = sstuning_limits.plan_file(options, target, nofile, bool(force), ceiling)
    if planned["changed"] and not test:
        with sstuning_journal.lock(options["state_dir"]):
            sstuning_journal.remember(options["state_dir"], sstuning_journal.load_originals(options["state_dir"]),
                                      files=[planned["path"]], written={planned["path"]: planned["text"]})
            sstuning_limits.write_file(options, planned)
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
    target = {"kind": "ulimit", "path": sstuning_settings.validate_path(path, "path"),
              "placement": sstuning_settings.validate_choice(placement, ("end", "init"), "placement"),
              "required": sstuning_settings.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
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
    if not isinstance(key, str) or not sstuning_lines.ENV_KEY.match(key):
        raise SaltInvocationError(f"key: {key!r} is not a shell variable name such as MAXFD")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not sstuning_lines.ENV_VALUE.match(str(value)):
        raise SaltInvocationError(
            f"{key}: {value!r} is not a plain value (letters, digits and ./:@%+,=- only; nothing a shell would expand)"
        )
    target = {"kind": "assignment", "path": sstuning_settings.validate_path(path, "path"), "key": key,
              "required": sstuning_settings.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
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
    target = {"kind": "minfds", "path": sstuning_settings.validate_path(path, "path"),
              "required": sstuning_settings.validate_choice(if_missing, ("fail", "skip"), "if_missing") == "fail"}
    return _one_file(target, nofile, test, force)


def dropin_path(unit):
    """
    The drop-in file that carries ``LimitNOFILE`` for a unit; for a template
    unit (``name@.service``) it applies to every instance.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.dropin_path shadowsocks-libev-server@.service
    """
    return sstuning_units.dropin_path(_options()["systemd_dir"], sstuning_settings.validate_unit(unit, "unit"))


def set_systemd_nofile(unit, nofile, test=False, if_missing="fail"):
    """
    Write a systemd drop-in with ``LimitNOFILE`` of at least ``nofile`` for a
    service unit (template units such as ``shadowsocks-libev-server@.service``
    included), per field and never below what the unit file and its other
    drop-ins give it; none when they give enough already.
    Run ``daemon-reload`` and restart the unit afterwards (``stop_start``).
    ``if_missing`` applies to the unit: ``skip`` leaves units that are not
    installed alone.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_systemd_nofile supervisor.service 51200 test=True
    """
    unit = sstuning_settings.validate_unit(unit, "unit")
    if_missing = sstuning_settings.validate_choice(if_missing, ("fail", "skip"), "if_missing")
    options = _options()
    if if_missing == "fail" and sstuning_units.unit_file(options["unit_dirs"], unit) is None:
        raise CommandExecutionError(
            f"{unit}: no unit file in {', '.join(options['unit_dirs'])}; install it, or remove it from pillar "
            f"{sstuning_settings.LIMITS}"
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
    sstuning_settings.validate_choice(prefer, sstuning_settings.INIT_SYSTEMS, "prefer")
    if prefer != "auto":
        return prefer
    return "systemd" if os.path.isdir(_options()["systemd_marker"]) else "sysvinit"


def nofile_grantable(init_system=None):  # pylint: disable=redefined-outer-name
    """
    The highest open-file limit a service started here can get: under
    sysvinit salt starts it, under systemd PID 1 does; either grants up to
    ``fs.nr_open`` with CAP_SYS_RESOURCE, else up to its own hard limit
    (``ulimit -n N`` above it fails with "Operation not permitted"; systemd
    clamps a larger ``LimitNOFILE`` silently).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_grantable
    """
    system = init_system or globals()["init_system"]()
    sstuning_settings.validate_choice(system, ("sysvinit", "systemd"), "init_system")
    return sstuning_limits.grantable(_options()["proc_root"], system)


def nofile(nofile=None, names=None, pidfiles=None, wait=0, wanted=None, plan=None):  # pylint: disable=redefined-outer-name
    """
    Report the open-file limits of every process of the managed kinds of
    daemon (supervisord, ``ss-server``, ``ss-local``, ``ss-manager``,
    ``ssserver``, ``outline-ss-server``, ``xray``, ``v2ray``, ``sing-box``,
    ...): soft and hard from ``/proc/<pid>/limits`` against ``nofile``
    (pillar ``shadowsocks:tuning:nofile`` when omitted; ``wanted`` is the
    name earlier releases used), and for a process below it the reason when
    it can be told (a parent's hard limit without CAP_SYS_RESOURCE,
    ``fs.nr_open``, or a process started before the limit was configured).
    Plugins (``obfs-server``, ``v2ray-plugin``, or any child of a shadowsocks
    server) and the servers ``ss-manager`` starts are checked too.
    ``pidfiles`` limits the report to the process trees of those daemons;
    ``wait`` seconds gives restarted daemons time to come up.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile
        salt-call shadowsocks_tuning.nofile 16384 pidfiles='[/var/run/supervisord.pid]'
    """
    nofile = nofile if nofile is not None else wanted
    table = None
    if plan is not None and _plan(plan=plan).settings:
        resolved, options = plan.settings, plan.options
        # Nothing of this run started or stopped a process: the plan's table
        # of them still holds (their limits are read again, after any raise).
        table = plan.limits["table"] if plan.fresh_for("processes") and not plan.pending else None
    else:
        resolved, options = _settings({"nofile": nofile})
    kinds = (plan.limits["kinds"] if table is not None
             else sstuning_limits.serving(options, resolved["limits"]["kinds"]))
    wait = sstuning_settings.validate_seconds(wait, "wait", 0, 600)
    # Under systemd a daemon below nofile is explained from what systemctl show says of its unit.
    systemctl = sstuning_services.find_systemctl(options) if resolved["limits"]["init_system"] == "systemd" else None
    return sstuning_limits.verify(options["proc_root"], resolved["nofile"],
                                  sstuning_limits.process_names(names, kinds), _pidfiles(pidfiles), wait,
                                  sstuning_limits.parent_names(kinds), table, systemctl)


def stop_start(name, pidfile=None, when=None, init_system=None, timeout=None, grace=None, test=False,  # pylint: disable=redefined-outer-name
               init=None):
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
    init_system
        ``auto``, ``systemd`` or ``sysvinit`` (see ``init_system``; ``init``
        is the name earlier releases used).
    timeout
        Seconds for the stop and for the start.
    grace
        Seconds the daemon must stay up after it started: one that dies at
        once (a crash loop) fails, named. ``0`` skips the check.

    Left out, ``when``, ``init_system``, ``timeout`` and ``grace`` come from
    pillar ``shadowsocks:tuning:limits`` (``restart``, ``init_system``,
    ``timeout``, ``grace``). The comment says how many live TCP connections
    the stop cuts (counted from the sockets of the daemon and its children).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.stop_start supervisor pidfile=/var/run/supervisord.pid test=True
    """
    resolved, options = _settings()
    limits = resolved["limits"]
    default = limits["restart"] if limits["restart"] != "live" else "running"
    when = sstuning_settings.validate_choice(when or default, ("running", "always", "never"), "when")
    timeout = sstuning_settings.validate_seconds(timeout or limits["timeout"], "timeout")
    grace = sstuning_settings.validate_grace(limits["grace"] if grace is None else grace, "grace")
    if pidfile is not None:
        pidfile = sstuning_settings.validate_path(pidfile, "pidfile")
    chosen = init_system or init
    system = globals()["init_system"](chosen) if chosen else limits["init_system"]
    name = sstuning_settings.validate_unit(name, "name") if system == "systemd" else \
        sstuning_settings.validate_service(name, "name")
    with contextlib.nullcontext() if test else sstuning_journal.lock(options["state_dir"]):
        return sstuning_limits.restart(options, name, pidfile, when, system, timeout, grace, bool(test))
