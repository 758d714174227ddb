"""
Kernel and open-file tuning for shadowsocks servers: the Salt face of the
engines in ``_utils/sstuning_*.py``. This file holds the kernel half
(sysctls), ``plan``, ``clean``, ``container`` and ``diagnose``; the
open-file-limit half lives in ``shadowsocks_tuning_limits.py``, which Salt's
loader files under the same name ``shadowsocks_tuning``.

The two files are the only places that read Salt: minion options
(``__opts__``) and pillar ``shadowsocks:tuning`` (``__pillar__``) are read
once per call and turned into one plan (``sstuning_plan.make``: settings,
both halves, every problem), which the engines act on as plain values. The
states of one run share that plan. Any problem anywhere in the pillar fails
every function that acts, before anything is written.

Minion options ``shadowsocks_tuning.<name>`` (all optional; the defaults,
in ``OPTIONS`` of ``sstuning_settings``, are the real system): ``proc_root``,
``state_dir``, ``sysctl_dirs``, ``sysctl_conf``, ``modules_load_dir``,
``init_dir``, ``service_cmd``, ``systemctl``, ``systemd_marker``,
``systemd_dir``, ``unit_dirs``, ``ss_config_dir``.
"""

import contextlib
import sys

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"
__func_alias__ = {"set_": "set"}

# The engines are flat files imported by name, all of them here: Salt's loader
# puts the synced utils on sys.path only while it imports this file (an import
# inside a function fails in a minion daemon) (file_roots + sync_all,
# salt-ssh), a pip install's entry point puts its own copy there. `fresh()`
# forgets engines a re-sync replaced (see sstuning_imports).
try:
    from sstuning_imports import fresh

    with fresh():
        import sstuning_catalogue
        import sstuning_container
        import sstuning_diagnose
        import sstuning_journal
        import sstuning_limits
        import sstuning_plan
        import sstuning_procfs
        import sstuning_settings
        import sstuning_sysctl
    _MISSING = None
except ImportError as exc:
    _MISSING = str(exc)


def __virtual__():
    if not sys.platform.startswith("linux"):
        return (False, f"shadowsocks_tuning: needs a Linux kernel (/proc/sys); this is {sys.platform}")
    if _MISSING:
        return (False, f"shadowsocks_tuning: its engines (_utils/sstuning_*.py) were not found ({_MISSING}); run "
                       "saltutil.sync_all (file_roots) or reinstall the package (pip)")
    return __virtualname__


# --------------------------------------------------------------------------
# Reading Salt once
# --------------------------------------------------------------------------
def _options():
    return sstuning_plan.options(__opts__.get)


def _plan(arguments=None, test=True):
    """The plan of pillar shadowsocks:tuning and ``arguments``, or the one a state passed in."""
    given = (arguments or {}).pop("plan", None) if arguments else None
    if given is not None:
        if not isinstance(given, sstuning_plan.Plan):
            raise SaltInvocationError("plan: leave it out: a plan is made by this package's own states")
        return given
    return sstuning_plan.make(_options(), globals().get("__pillar__", {}), arguments, test)


def _settings(arguments=None):
    """(settings, options): pillar shadowsocks:tuning and ``arguments``, validated whole."""
    options = _options()
    return sstuning_plan.resolve(options, globals().get("__pillar__", {}), arguments), options


def _sysctl_args(profile, sysctls, config, force, policy, congestion_fallback, plan=None):
    return {"profile": profile, "sysctls": sysctls, "config": config, "force": force, "policy": policy,
            "congestion_fallback": congestion_fallback, "plan": plan}


def _keys_arg(keys):
    if keys is None:
        return list(sstuning_catalogue.CATALOGUE)
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
    return sstuning_catalogue.validate_key(key)


def normalise(key, value):
    """
    Validate ``value`` for ``key`` against the catalogue and return it in the
    kernel's canonical text form (``4096 87380 67108864``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.normalise net.ipv4.tcp_rmem '[4096, 87380, 67108864]'
    """
    return sstuning_catalogue.normalise(key, value)


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
    root = __opts__.get("shadowsocks_tuning.proc_root", sstuning_settings.OPTIONS["proc_root"])
    if len(keys) == 1 and isinstance(keys[0], str) and "," not in keys[0]:
        key = keys[0]
        try:
            return sstuning_procfs.read(root, key)
        except FileNotFoundError:
            raise CommandExecutionError(
                f"{key}: not present on this kernel ({sstuning_procfs.sysctl_path(root, key)} does not exist)")
        except OSError as exc:
            raise CommandExecutionError(f"{key}: cannot read: {exc.strerror}")
    wanted = []
    for key in keys:
        wanted.extend(_keys_arg(key))
    return {key: sstuning_procfs.read_or(root, key) for key in wanted}


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
    text = sstuning_catalogue.normalise(key, value)
    return sstuning_sysctl.set_key(_options()["proc_root"], key, text, bool(force))


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
        sstuning_catalogue.validate_key(key)
    root = _options()["proc_root"]
    child = sstuning_procfs.in_child_netns(root)
    return {key: sstuning_sysctl.probe_key(root, key, wanted.get(key), child) for key in names}


def catalogue():
    """
    Return the per-key knowledge this package works from: value type,
    namespace scope, bounds, capacity keys, removed keys and modules.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.catalogue
    """
    return sstuning_catalogue.describe()


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
    return _settings(arguments)[0]


def profile(name=None, sysctls=None):
    """
    Show the settings a profile resolves to after ``include`` and pillar
    overrides (``shadowsocks:tuning``): each key's value and where it came from.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.profile
        salt-call shadowsocks_tuning.profile bbr
    """
    resolved = _settings({"profile": name, "sysctls": sysctls})[0]
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
    return _settings()[0]["profiles"]


def plan(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, nofile=None,
         limits=None, test=True):
    """
    What ``state.apply shadowsocks.tuning`` would do, both halves, planned
    once and written nowhere: ``{"ok", "errors", "notes", "sysctl":
    {changes, comment}, "limits": {files, processes, notes},
    "pending_restarts"}``. ``errors`` holds every problem of either half,
    which would stop every state. The states of one run share one plan.
    Arguments left out come from pillar ``shadowsocks:tuning``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.plan
        salt-call shadowsocks_tuning.plan profile=bbr nofile=16384
    """
    arguments = _sysctl_args(profile, sysctls, config, force, policy, congestion_fallback)
    arguments.update(nofile=nofile, limits=limits)
    arguments.pop("plan")
    return _plan(arguments, bool(test))


def diff(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, test=True,  # noqa: ARG001
         plan=None):  # pylint: disable=redefined-outer-name
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
    planned = _plan(_sysctl_args(profile, sysctls, config, force, policy, congestion_fallback, plan), True)
    if planned.sysctl is None:
        return {"changes": {}, "comment": [], "errors": planned.errors, "profile": profile}
    half = planned.sysctl
    return {"changes": half["changes"], "comment": half["comment"], "profile": half["profile"],
            "errors": planned.errors}


def apply(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None,
          plan=None):  # pylint: disable=redefined-outer-name
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
    arguments = _sysctl_args(profile, sysctls, config, force, policy, congestion_fallback, plan)
    planned = _plan(arguments, test=False)
    with sstuning_journal.lock(planned.options["state_dir"]):
        # Under the lock: a dry-run plan loaded no module, a consumed one is
        # spent, and one that another run's writes made stale is planned again.
        if planned.test or not planned.fresh_for("sysctl") or planned.stale():
            sstuning_plan.remake(planned, globals().get("__pillar__", {}))
        if planned.errors:
            sstuning_plan.fail(planned)
        half = planned.sysctl
        if half["changes"]:
            # Left by a run that died between write and rename; only a run that writes tidies up.
            for path in sstuning_sysctl.managed_paths(planned.settings, planned.options) | {
                    sstuning_journal.originals_path(planned.options["state_dir"])}:
                sstuning_journal.remove_stray_temporaries(path)
        result = sstuning_sysctl.apply(planned.settings, planned.options, half)
        planned.written("sysctl", changed=bool(result["changes"]))
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
    resolved, options = _settings({"profile": profile, "sysctls": sysctls, "config": config, "force": force})
    report = sstuning_sysctl.verify(resolved, options)
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
    Returns ``{"profile", "notes", "buys", "keys"}``: ``notes`` says why
    ``profile: auto`` chose what it chose; ``buys`` is what each built-in
    profile was measured to buy (``bench/effect``), a line each, to choose by.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.explain
        salt-call shadowsocks_tuning.explain bbr
        salt-call shadowsocks_tuning.explain auto
    """
    resolved, options = _settings({"profile": profile})
    return {"profile": resolved["profile"], "notes": resolved["notes"], "buys": sstuning_catalogue.EFFECTS,
            "keys": sstuning_sysctl.explain(resolved, options)}


def container(format="compose", profile=None, service="shadowsocks", kind="shadowsocks_libev"):  # pylint: disable=redefined-builtin
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
    sstuning_container.validate_format(format)
    sstuning_container.validate_service(service)
    resolved, options = _settings({"profile": profile})
    # The container runs it, whether or not this box's pillar manages that kind here.
    kinds = resolved["daemons"]
    if kind not in kinds:
        raise SaltInvocationError(f"kind: {kind!r} is not a kind of daemon this package knows "
                                  f"(known: {', '.join(kinds)})")
    root = options["proc_root"]
    keys = set(resolved["sysctls"]) | {sstuning_procfs.AVAILABLE_CC, sstuning_procfs.ALLOWED_CC}
    live = {key: sstuning_procfs.read_or(root, key) for key in keys}
    return sstuning_container.container(
        resolved, format, live,
        available=(live[sstuning_procfs.AVAILABLE_CC] or "").split(),
        allowed=(live[sstuning_procfs.ALLOWED_CC] or "").split(),
        config_ports=sstuning_sysctl.config_ports(options, {kind: kinds[kind]}), service=service,
        kind=kinds[kind],
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
    resolved, options = _settings()
    managed = sstuning_sysctl.managed_paths(resolved, options) | sstuning_limits.managed_paths(resolved, options)
    with contextlib.nullcontext() if test else sstuning_journal.lock(options["state_dir"]):
        changes = sstuning_journal.restore(options["state_dir"], options["proc_root"], managed, bool(test), bool(force))
        if changes and not test:
            sstuning_journal.bump(options["state_dir"])  # a run waiting on the lock plans again
        return sstuning_limits.reload_after_clean(resolved, options, changes, bool(test))


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
        resolved, options = _settings()
        config, wanted, kinds = resolved["config"], resolved["nofile"], resolved["daemons"]
    except SaltInvocationError as exc:
        options, config, wanted = _options(), sstuning_settings.DEFAULTS["config"], None
        kinds = sstuning_settings.resolve({})["daemons"]
        notes.append(f"pillar {sstuning_settings.PILLAR} is not valid, so drift is checked against {config}: {exc}")
    result = sstuning_diagnose.report(options["proc_root"], options["state_dir"], config,
                                      sstuning_limits.process_names(names, kinds), limits[0], limits[1], wanted,
                                      previous, bool(save), notes, parents=sstuning_limits.parent_names(kinds))
    if result["severity"] == "critical":
        __context__["retcode"] = 1
    return result


def daemons():
    """
    The kinds of daemon whose open-file limit this package manages, after
    pillar ``shadowsocks:tuning:limits``: per kind its programs, plugins,
    service, units, defaults file, configs, whether it raises its own soft
    limit, the processes of it running now, and ``left_alone``: why a
    multi-protocol server is not managed here (no shadowsocks inbound), or
    None.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.daemons
    """
    resolved, options = _settings()
    kinds = resolved["limits"]["kinds"]
    table = sstuning_procfs.process_table()
    running = sstuning_limits.processes(table, kinds)
    return {name: dict(kind, running=[f"{p['name']}[{p['pid']}] {p['soft']}:{p['hard']}" for p in running.values()
                                      if p["kind"] == name],
                       left_alone=sstuning_limits.not_serving(options, name, kind))
            for name, kind in kinds.items()}
