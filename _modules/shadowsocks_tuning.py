"""
Kernel and open-file tuning for shadowsocks servers: the Salt face of the
engines in ``_utils/sstuning_*.py``.

This module is the only place that reads Salt: minion options
(``__opts__``) and pillar ``shadowsocks:tuning`` (``__pillar__``) are read
once per call, resolved into validated settings by
``sstuning_settings.resolve``, and passed down as plain values to the
sysctl engine (``sstuning_sysctl``) and the open-file-limit engine
(``sstuning_limits``). Any problem anywhere in the pillar fails every
function that acts, before anything is written.

Minion options ``shadowsocks_tuning.<name>`` (all optional; the defaults,
in ``OPTIONS`` of ``sstuning_settings``, are the real system): ``proc_root``,
``state_dir``, ``sysctl_dirs``, ``sysctl_conf``, ``modules_load_dir``,
``init_dir``, ``service_cmd``, ``systemctl``, ``systemd_marker``,
``systemd_dir``, ``unit_dirs``, ``ss_config_dir``.
"""

import contextlib
import importlib
import importlib.machinery
import os
import sys

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"
__func_alias__ = {"set_": "set"}

# The engines, flat files in _utils/ (dependencies first). Their names share
# the global sys.modules with everything else, hence the prefix.
UTILS = (
    "sstuning_catalogue", "sstuning_settings", "sstuning_procfs", "sstuning_journal", "sstuning_sysctld",
    "sstuning_lines", "sstuning_ports", "sstuning_services", "sstuning_sysctl", "sstuning_limits",
    "sstuning_container", "sstuning_diagnose",
)


def _utils_dir():
    """Where the engines are: the synced ``extmods/utils`` (file_roots +
    ``saltutil.sync_all``) or the files salt-ssh shipped, both on sys.path
    while Salt's loader imports this module; else the copy a pip install
    put inside the package."""
    spec = importlib.machinery.PathFinder.find_spec(UTILS[0])
    if spec is not None and spec.origin:
        return os.path.dirname(spec.origin)
    try:
        from saltext_shadowsocks_tuning import utils_dir  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return utils_dir()


def _import_utils():
    """Import the engines from one directory. A long-running minion keeps its
    first import of a module after ``saltutil.sync_all``: re-import all of
    them when any file changed or moved, so no stale engine stays."""
    directory = _utils_dir()
    if directory is None:
        return None
    stamps = {}
    for name in UTILS:
        path = os.path.join(directory, f"{name}.py")
        try:
            stamps[name] = (path, os.stat(path).st_mtime_ns)
        except OSError:
            return None
    fresh = all(getattr(sys.modules.get(name), "__sstuning_stamp__", None) == stamps[name] for name in UTILS)
    if not fresh:
        for name in UTILS:
            sys.modules.pop(name, None)
        sys.path.insert(0, directory)
        try:
            for name in UTILS:
                importlib.import_module(name).__sstuning_stamp__ = stamps[name]
        finally:
            sys.path.remove(directory)
    return {name: sys.modules[name] for name in UTILS}


_ENGINES = _import_utils()
if _ENGINES:
    catalogue_data = _ENGINES["sstuning_catalogue"]
    settings_mod = _ENGINES["sstuning_settings"]
    procfs = _ENGINES["sstuning_procfs"]
    journal = _ENGINES["sstuning_journal"]
    sysctl_engine = _ENGINES["sstuning_sysctl"]
    limits_engine = _ENGINES["sstuning_limits"]
    services = _ENGINES["sstuning_services"]


def __virtual__():
    if not sys.platform.startswith("linux"):
        return (False, f"shadowsocks_tuning: needs a Linux kernel (/proc/sys); this is {sys.platform}")
    if not _ENGINES:
        return (False, "shadowsocks_tuning: its engines (_utils/sstuning_*.py) were not found; run "
                       "saltutil.sync_all (file_roots) or reinstall the package (pip)")
    return __virtualname__


# --------------------------------------------------------------------------
# Reading Salt once
# --------------------------------------------------------------------------
def _options():
    return settings_mod.options(__opts__.get)


def _resolve(arguments=None):
    """(settings, options): pillar shadowsocks:tuning and ``arguments``, validated whole."""
    opts = _options()
    tuning = settings_mod.pillar_tuning(globals().get("__pillar__", {}))
    settings = settings_mod.resolve(
        tuning, arguments, nr_open=procfs.nr_open(opts["proc_root"]), systemd=os.path.isdir(opts["systemd_marker"])
    )
    return settings, opts


def _prepare(arguments, test):
    """Resolve, then plan both halves and collect every problem: a typo or a
    missing target in one half stops the other too."""
    settings, opts = _resolve(arguments)
    sysctls = sysctl_engine.prepare(settings, opts, test)
    limits = limits_engine.plan(settings, opts)
    errors = sysctls["errors"] + limits["errors"]
    try:
        journal.load_originals(opts["state_dir"])  # a broken record would stop the first write
    except CommandExecutionError as exc:
        errors.append(str(exc))
    return settings, opts, sysctls, limits, errors


def _fail(errors):
    raise CommandExecutionError("\n".join(errors) + "\nNothing was changed")


def _sysctl_args(profile, sysctls, config, force, policy, congestion_fallback):
    return {"profile": profile, "sysctls": sysctls, "config": config, "force": force, "policy": policy,
            "congestion_fallback": congestion_fallback}


def _keys_arg(keys):
    if keys is None:
        return list(catalogue_data.CATALOGUE)
    if isinstance(keys, str):
        return [k.strip() for k in keys.split(",") if k.strip()]
    return list(keys)


# --------------------------------------------------------------------------
# Sysctls
# --------------------------------------------------------------------------
def validate_key(key):
    """
    Check that ``key`` is a well-formed sysctl name and return it: dot-separated
    segments of letters, digits, ``_``, ``-`` (plus ``@ : +`` of interface
    names) under a known top-level directory, so it never names a path
    outside ``/proc/sys``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.validate_key net.core.somaxconn
    """
    return catalogue_data.validate_key(key)


def normalise(key, value):
    """
    Validate ``value`` for ``key`` against the catalogue and return it in the
    kernel's canonical text form (``4096 87380 67108864``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.normalise net.ipv4.tcp_rmem '[4096, 87380, 67108864]'
    """
    return catalogue_data.normalise(key, value)


def get(*keys):
    """
    Return the live value of a sysctl, normalised (``4096\\t87380`` becomes
    ``4096 87380``). Several keys, or a list, give a ``{key: value}`` dict;
    a key the kernel lacks maps to ``None`` there.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.get net.core.somaxconn
        salt-call shadowsocks_tuning.get net.core.somaxconn net.ipv4.tcp_rmem
        salt-call shadowsocks_tuning.get '[net.core.somaxconn, net.ipv4.tcp_rmem]'
    """
    if not keys:
        raise SaltInvocationError("get: name at least one sysctl key, e.g. net.core.somaxconn")
    root = __opts__.get("shadowsocks_tuning.proc_root", settings_mod.OPTIONS["proc_root"])
    if len(keys) == 1 and isinstance(keys[0], str) and "," not in keys[0]:
        key = keys[0]
        try:
            return procfs.read(root, key)
        except FileNotFoundError:
            raise CommandExecutionError(f"{key}: not present on this kernel ({procfs.sysctl_path(root, key)} does not exist)")
        except OSError as exc:
            raise CommandExecutionError(f"{key}: cannot read: {exc.strerror}")
    wanted = []
    for key in keys:
        wanted.extend(_keys_arg(key))
    return {key: procfs.read_or(root, key) for key in wanted}


def set_(key, value, force=False):
    """
    Write a sysctl through /proc/sys now (not persisted), read it back and
    return ``{"old": ..., "new": ...}``. A capacity key (see ``catalogue``) is
    never lowered unless ``force=True``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set net.core.somaxconn 8192
        salt-call shadowsocks_tuning.set net.ipv4.tcp_rmem '4096 87380 67108864'
    """
    text = catalogue_data.normalise(key, value)
    return sysctl_engine.set_key(_options()["proc_root"], key, text, bool(force))


def probe(keys=None):
    """
    Classify each key as ``writable``, ``absent`` (the kernel lacks it: removed,
    or its module is not loaded), ``read-only`` (a global key inside a child
    network namespace, or a read-only /proc/sys) or ``restricted`` (a
    congestion control that is not available or not allowed here), each with
    a reason a person can act on. ``keys`` is a list, or a ``{key: wanted
    value}`` mapping so that values are checked too; every catalogue key when
    omitted.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.probe
        salt-call shadowsocks_tuning.probe '[net.core.rmem_max, net.ipv4.tcp_fastopen]'
        salt-call shadowsocks_tuning.probe '{net.ipv4.tcp_congestion_control: hybla}'
    """
    wanted = keys if isinstance(keys, dict) else {}
    names = _keys_arg(keys)
    for key in names:
        catalogue_data.validate_key(key)
    root = _options()["proc_root"]
    child = procfs.in_child_netns(root)
    return {key: sysctl_engine.probe_key(root, key, wanted.get(key), child) for key in names}


def catalogue():
    """
    Return the per-key knowledge this package works from: value type,
    namespace scope, bounds, capacity keys, removed keys and modules.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.catalogue
    """
    return catalogue_data.describe()


def settings(**arguments):
    """
    Show the settings every state works from: pillar ``shadowsocks:tuning``
    (and any arguments given here) over the defaults, validated whole. Fails,
    naming every bad pillar path, exactly when the states would.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.settings
        salt-call shadowsocks_tuning.settings nofile=16384
    """
    arguments = {k: v for k, v in arguments.items() if not k.startswith("__")}
    return _resolve(arguments)[0]


def profile(name=None, sysctls=None):
    """
    Show the settings a profile resolves to after ``include`` and pillar
    overrides (``shadowsocks:tuning``): each key's value and where it came from.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.profile
        salt-call shadowsocks_tuning.profile bbr
    """
    resolved = _resolve({"profile": name, "sysctls": sysctls})[0]
    return {
        "profile": resolved["profile"],
        "include_chain": resolved["chain"],
        "sysctls": resolved["sysctls"],
        "sources": resolved["sources"],
        "config": resolved["config"],
    }


def profiles():
    """
    List the known profiles (built in and from pillar) with their descriptions.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.profiles
    """
    return _resolve()[0]["profiles"]


def diff(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, test=True):  # noqa: ARG001
    """
    Compute what applying the sysctl tuning would change, without writing
    anything: ``{"changes": {key: {old, new}, <config file>: {diff}},
    "comment": [...], "errors": [...]}``. ``errors`` holds every problem of
    either half (a bad open-file pillar too), which would stop ``apply``.
    Arguments left out come from pillar ``shadowsocks:tuning``; ``test`` is
    accepted and ignored (nothing is ever written).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.diff
        salt-call shadowsocks_tuning.diff profile=bbr
    """
    try:
        _, _, sysctls_plan, _, errors = _prepare(_sysctl_args(profile, sysctls, config, force, policy,
                                                              congestion_fallback), test=True)
    except SaltInvocationError as exc:
        return {"changes": {}, "comment": [], "errors": [str(exc)], "profile": profile}
    return {key: sysctls_plan[key] for key in ("changes", "comment", "profile")} | {"errors": errors}


def apply(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None):
    """
    Apply the sysctl tuning: write every sysctl that differs in one pass, then
    persist the managed file atomically. All or nothing: if the kernel
    rejects one value, the keys already written are put back and nothing is
    persisted. Nothing at all is written when any part of pillar
    ``shadowsocks:tuning`` is invalid. Arguments left out come from pillar.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.apply
        salt-call shadowsocks_tuning.apply profile=bbr config=/etc/sysctl.d/60-shadowsocks.conf
    """
    arguments = _sysctl_args(profile, sysctls, config, force, policy, congestion_fallback)
    state_dir = _options()["state_dir"]
    with journal.lock(state_dir):
        resolved, opts, sysctls_plan, _, errors = _prepare(arguments, test=False)
        if errors:
            _fail(errors)
        if sysctls_plan["changes"]:
            # Left by a run that died between write and rename; only a run that writes tidies up.
            for path in (resolved["config"], journal.originals_path(state_dir),
                         os.path.join(opts["modules_load_dir"], sysctl_engine.MODULES_LOAD_NAME)):
                journal.remove_stray_temporaries(path)
        result = sysctl_engine.apply(resolved, opts, sysctls_plan)
    return {key: result[key] for key in ("changes", "comment", "errors", "profile")}


def verify(profile=None, sysctls=None, config=None, force=None):
    """
    Compare live values and the persisted file with the resolved profile and
    pillar. Per key: ``ok``, ``drift`` (live or persisted value differs),
    ``absent``, ``read-only``, ``restricted`` or ``overridden`` (a file read
    later at boot wins). salt-call exits non-zero when anything drifted or is
    overridden, so this serves monitoring.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.verify
        salt '*' shadowsocks_tuning.verify
    """
    resolved, opts = _resolve({"profile": profile, "sysctls": sysctls, "config": config, "force": force})
    report = sysctl_engine.verify(resolved, opts)
    if not report["ok"]:
        __context__["retcode"] = 1
    return report


def explain(profile=None):
    """
    Say, per key of the recipe and of the profile, what the tuning does on
    this kernel and why: the recipe's value, the live value, the profile's
    value, the action (``set``, ``in place``, ``kept`` higher or chosen by the
    admin, ``lowered`` on purpose, ``merged`` reserved ports, ``satisfied``
    by a removed key, ``absent``, ``read-only`` global key in a container,
    ``restricted``) and whether the value is persisted. Writes nothing.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.explain
        salt-call shadowsocks_tuning.explain bbr
    """
    resolved, opts = _resolve({"profile": profile})
    return sysctl_engine.explain(resolved, opts)


def container(format="compose", profile=None, service="shadowsocks"):  # pylint: disable=redefined-builtin
    """
    Print the tuning for a container: the per-network-namespace sysctls of
    the profile and pillar ``shadowsocks:tuning`` (resolved as ``apply`` and
    ``verify`` resolve them, and never below what this kernel has) with the
    open-file limit ``nofile``, as a docker-compose file (``format=compose``:
    ``sysctls`` and ``ulimits`` of service ``service``; merge it with
    ``docker compose -f compose.yaml -f tuning.yaml``), a ``docker run``
    command line (``format=docker``), or a pod's ``securityContext.sysctls``
    (``format=kubernetes``, keys Kubernetes counts as unsafe marked). Global
    keys (``net.core.rmem_max``, ``fs.*``) cannot be set from a container:
    they are listed in ``host_only`` for the host. Writes nothing.

    Returns ``{"format", "profile", "text", "sysctls", "nofile", "host_only",
    "unsafe_in_kubernetes", "left_out", "notes"}``; ``text`` is the snippet.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.container
        salt-call shadowsocks_tuning.container format=docker profile=bbr
        salt-call --out=json shadowsocks_tuning.container format=kubernetes | jq -r .local.text
    """
    engine = _ENGINES["sstuning_container"]
    engine.validate_format(format)
    engine.validate_service(service)
    resolved, opts = _resolve({"profile": profile})
    root = opts["proc_root"]
    keys = set(resolved["sysctls"]) | {procfs.AVAILABLE_CC, procfs.ALLOWED_CC}
    live = {key: procfs.read_or(root, key) for key in keys}
    return engine.container(
        resolved, format, live,
        available=(live[procfs.AVAILABLE_CC] or "").split(), allowed=(live[procfs.ALLOWED_CC] or "").split(),
        config_ports=_ENGINES["sstuning_ports"].config_ports(opts["ss_config_dir"]), service=service,
    )


def clean(test=False, force=False):
    """
    Undo what this package did: put back the live values it found before its
    first change, restore the files it changed byte for byte (removing those it
    created, but keeping lines added to them since), and forget the saved
    originals. It refuses, changing nothing, when the record names a file the
    current settings do not manage, or when putting back a file that existed
    would lose lines added since this package wrote it (``force=True`` puts
    the original back anyway). ``test=True`` only reports.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.clean test=True
        salt-call shadowsocks_tuning.clean
    """
    settings, opts = _resolve()
    managed = sysctl_engine.managed_paths(settings, opts) | limits_engine.managed_paths(settings, opts)
    with contextlib.nullcontext() if test else journal.lock(opts["state_dir"]):
        return journal.restore(opts["state_dir"], opts["proc_root"], managed, bool(test), bool(force))


# --------------------------------------------------------------------------
# Open-file limits
# --------------------------------------------------------------------------
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
        resolved, _, _, planned, errors = _prepare({"nofile": nofile, "limits": limits}, test=True)
    except SaltInvocationError as exc:
        return {"ok": False, "nofile": None, "init_system": None, "grantable": None, "manage": [], "skipped": [],
                "errors": [str(exc)], "notes": [], "verify": None}
    notes = ["not installed, left alone: " + ", ".join(planned["skipped"])] if planned["skipped"] else []
    return {
        "ok": not errors,
        "nofile": resolved["nofile"],
        "init_system": resolved["init_system"],
        "grantable": limits_engine.grantable(_options()["proc_root"])["limit"],
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
    # The kernel half is planned as a dry run here: this call loads no module.
    arguments = {}
    # A dry run takes no lock: it must not even create state_dir.
    with contextlib.nullcontext() if test else journal.lock(_options()["state_dir"]):
        resolved, opts, _, planned, errors = _prepare(arguments, test=True)
        if errors:
            _fail(errors)
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


# --------------------------------------------------------------------------
# Diagnosis (the beacon reads the same report)
# --------------------------------------------------------------------------
def diagnose(headroom=20, critical=5, names=None, previous=None, save=True):
    """
    Say what a busy server is short of, from the kernel's own numbers. Each
    finding has a ``symptom``, its ``evidence`` (the value and its ``change``
    since the previous call), the ``limit`` involved, the ``pillar`` key that
    addresses it, a ``fix`` and a ``severity`` (``ok``, ``warning``,
    ``critical``):

    - open files of every shadowsocks process (and its plugin children) and
      supervisord against its soft limit: ``warning`` under ``headroom``
      percent left, ``critical`` under ``critical`` percent;
    - ``fs.file-nr`` against ``fs.file-max``; TCP memory (``sockstat``)
      against ``net.ipv4.tcp_mem``; conntrack entries against
      ``nf_conntrack_max`` where conntrack is loaded;
    - rises of ``ListenOverflows``, ``ListenDrops``, ``TCPTimeWaitOverflow``,
      ``TCPMemoryPressures``, ``TCPAbortOnMemory``, the ``TCPFastOpen``
      fallbacks and blackhole (``/proc/net/netstat``) and of the Udp
      ``RcvbufErrors``, ``SndbufErrors``, ``InErrors`` (``/proc/net/snmp``),
      per network namespace;
    - managed sysctls whose live value drifted from the one this package applied.

    Changes are measured from the sample the previous call left in
    ``state_dir`` (the first call has no baseline and says so; a bad sample
    file is a note, not an error). ``previous`` (a ``sample`` returned by an
    earlier call with ``save=False``) is used instead, and ``save=False``
    leaves the file alone and returns the new ``sample``: what the beacon
    does. salt-call exits non-zero when a finding is critical.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.diagnose
        salt '*' shadowsocks_tuning.diagnose headroom=30
    """
    engine = _ENGINES["sstuning_diagnose"]
    limits = []
    for value, where, low in ((headroom, "headroom", 0), (critical, "critical", 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < 100:
            raise SaltInvocationError(f"{where}: {value!r} must be a percentage from 0 to 99")
        limits.append(value)
    if critical > headroom:
        raise SaltInvocationError(f"critical: {critical} must not be above headroom ({headroom})")
    if previous is not None and not isinstance(previous, dict):
        raise SaltInvocationError("previous: must be the `sample` an earlier diagnose save=False returned")
    notes = []
    try:
        resolved, opts = _resolve()
        config, wanted = resolved["config"], resolved["nofile"]
    except SaltInvocationError as exc:
        opts, config, wanted = _options(), settings_mod.DEFAULTS["config"], None
        notes.append(f"pillar {settings_mod.PILLAR} is not valid, so drift is checked against {config}: {exc}")
    result = engine.report(opts["proc_root"], opts["state_dir"], config, limits_engine.process_names(names),
                           limits[0], limits[1], wanted, previous, bool(save), notes)
    if result["severity"] == "critical":
        __context__["retcode"] = 1
    return result
