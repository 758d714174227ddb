"""
Declare the shadowsocks tuning; the work is done by the ``shadowsocks_tuning``
execution module. Each state only compares, honours ``test=True`` and turns
the engine's outcome into ``{name, result, changes, comment}``. Every state
that acts resolves the whole pillar ``shadowsocks:tuning`` first, so a typo
anywhere fails all of them and nothing is written.

.. code-block:: yaml

    shadowsocks-tuning-sysctls:
      shadowsocks_tuning.tuned:
        - profile: bbr          # anything left out comes from pillar shadowsocks:tuning

    shadowsocks-tuning-nofile-supervisor:
      shadowsocks_tuning.limits_applied:
        - part: supervisor      # pillar shadowsocks:tuning:limits:supervisor
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "shadowsocks_tuning"

# The plans of this run, by their arguments: the first state makes one, the
# others reuse it. A state run's __context__ is its own (Salt copies the
# module context for each run), so no later run sees these.
PLANS = "shadowsocks_tuning.plans"


def __virtual__():
    # Both files of the execution module (kernel half, open-file half): asking
    # for one function of each also loads them now, not inside a state's run.
    if "shadowsocks_tuning.apply" in __salt__ and "shadowsocks_tuning.nofile_apply" in __salt__:
        return __virtualname__
    return (False, "shadowsocks_tuning state: the shadowsocks_tuning execution module is not loaded (Linux only)")


def _plan(**arguments):
    """This run's plan for ``arguments`` (the planning ones: profile,
    sysctls, config, force, policy, congestion_fallback, nofile, limits)."""
    arguments = {k: v for k, v in arguments.items() if v is not None}
    key = (repr(sorted(arguments.items())), bool(__opts__["test"]))
    plans = __context__.setdefault(PLANS, {})
    if key not in plans:
        plans[key] = __salt__["shadowsocks_tuning.plan"](test=__opts__["test"], **arguments)
    return plans[key]


def tuned(name, profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None):
    """
    Make the kernel tuning of a profile live now and persisted for the next
    boot. Every argument left out is read from pillar ``shadowsocks:tuning``.

    name
        An ID; not used otherwise.
    profile
        ``high-latency``, ``low-latency``, ``low-memory``, ``bbr`` or a pillar profile.
    sysctls
        ``{key: value}`` overrides that win over the profile.
    config
        The persisted file (default ``/etc/sysctl.d/local.conf``).
    force
        Capacity keys that may be lowered (or ``True`` for all).
    policy
        ``{unavailable: warn|strict, override: warn|strict, keys: {key: warn|strict}}``.
    congestion_fallback
        Congestion control to use when the wanted one cannot be made available.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.tuned name=tuning profile=bbr config=/tmp/t.conf
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    args = {
        "profile": profile, "sysctls": sysctls, "config": config, "force": force,
        "policy": policy, "congestion_fallback": congestion_fallback,
    }
    try:
        plan = _plan(**args)
        if __opts__["test"]:
            outcome = __salt__["shadowsocks_tuning.diff"](plan=plan)
            if outcome["errors"]:
                ret["comment"] = "\n".join(outcome["errors"] + ["Nothing was changed"] + outcome["comment"])
                return ret
        else:
            outcome = __salt__["shadowsocks_tuning.apply"](plan=plan)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret

    ret["changes"] = outcome["changes"]
    lines = outcome["comment"]
    if not outcome["changes"]:
        ret["result"] = True
        skipped = " (with keys skipped: see below)" if any(line.startswith("skipped:") for line in lines) else ""
        ret["comment"] = "\n".join([f"Tuning of profile {outcome['profile']} is in place{skipped}"] + lines)
    elif __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "\n".join([f"Profile {outcome['profile']} would be applied"] + lines)
    else:
        ret["result"] = True
        ret["comment"] = "\n".join([f"Profile {outcome['profile']} applied"] + lines)
    return ret


def cleaned(name, force=False):
    """
    Undo ``tuned``: the live sysctls go back to the values found before the
    first change, and every file this package changed is restored byte for
    byte (or removed if it created it; lines added to it since are kept).
    Lines added since to a file that existed would be lost: the state fails
    and names them, unless ``force`` is true.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.cleaned name=undo test=True
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    try:
        changes = __salt__["shadowsocks_tuning.clean"](test=__opts__["test"], force=force)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    ret["changes"] = changes
    notes = [f"{path}: {what} {change[what]}" for path, change in changes.items() for what in ("kept", "lost")
             if what in change]
    if not changes:
        ret.update(result=True, comment="Nothing to undo: no change by shadowsocks_tuning is on record")
    elif __opts__["test"]:
        ret.update(result=None, comment="\n".join([f"{len(changes)} item(s) would be put back"] + notes))
    else:
        ret.update(result=True, comment="\n".join([f"{len(changes)} item(s) put back"] + notes))
    return ret


# ---- Open-file limits ----
#
# The SLS shadowsocks/tuning/nofile.sls uses `limits_applied` (one state per
# part of pillar `limits`) and `nofile_reached`. The single-file states below
# take explicit arguments, for SLS files of your own.
def _limit_ret(name):
    return {"name": name, "result": False, "changes": {}, "comment": ""}


def _outcome_state(name, function, label, *args, **kwargs):
    """Call an engine function that returns {changed, comment, old, new, ...}
    and turn it into a state return; `label` names the key of `changes`."""
    ret = _limit_ret(name)
    try:
        outcome = __salt__[function](*args, test=__opts__["test"], **kwargs)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    ret["comment"] = outcome["comment"]
    if outcome["changed"]:
        ret["changes"] = {outcome[label]: {"old": outcome["old"], "new": outcome["new"]}}
        if "diff" in outcome:
            ret["changes"]["diff"] = outcome["diff"]
        ret["result"] = None if __opts__["test"] else True
    else:
        ret["result"] = True
    return ret


def _file_state(name, function, **kwargs):
    return _outcome_state(name, function, "what", **kwargs)


def limits_applied(name, part=None):
    """
    Put the open-file limit (pillar ``shadowsocks:tuning:nofile``) where each
    kind of daemon reads it, for every part of pillar
    ``shadowsocks:tuning:limits`` or one: running daemons are raised in place
    first (``restart: live``, the default: no connection is cut), the files
    for the next start are written, and only what could not be raised in
    place is stopped and started (never Debian's ``restart``, which only
    stops supervisor). Fails, changing nothing, when any part of the pillar
    is invalid, a named init script is missing, or this box cannot grant
    the limit.

    part
        One kind of daemon (``supervisor``, ``shadowsocks_libev``,
        ``shadowsocks_rust``, ``outline``, ``xray``, ``v2ray``, ``sing_box``,
        or one of pillar's own), ``init_scripts`` or ``units``; every part
        when left out.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.limits_applied name=nofile test=True
        salt-call state.single shadowsocks_tuning.limits_applied name=supervisor part=supervisor
    """
    ret = _limit_ret(name)
    test = __opts__["test"]
    try:
        outcome = __salt__["shadowsocks_tuning.nofile_apply"](part=part, test=test, plan=_plan())
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    comments = list(outcome["notes"])
    for item in outcome["files"]:
        if item["skipped"]:
            continue  # not installed: said once in the notes
        comments.append(item["comment"])
        if item["changed"]:
            ret["changes"][item["path"]] = {"old": item["old"], "new": item["new"], "diff": item["diff"]}
    for raised in outcome["raised"]:
        comments.append(raised["comment"])
        if raised["changed"]:
            ret["changes"][f"pid {raised['pid']}"] = {"old": raised["old"], "new": raised["new"]}
    for restarted in outcome["restarts"]:
        comments.append(restarted["comment"])
        if restarted["changed"]:
            ret["changes"][f"service {restarted['name']}"] = {"old": restarted["old"], "new": restarted["new"]}
    comments.extend(p["comment"] for p in outcome["processes"] if p["action"] in ("left", "restart"))
    if not outcome["files"] and not outcome["processes"] and not outcome["restarts"]:
        comments.append(f"{part or 'limits'}: nothing installed to manage, or turned off in pillar")
    ret["comment"] = "\n".join(outcome["errors"] + comments)
    if outcome["errors"]:
        return ret  # the files written stay in `changes`
    ret["result"] = None if test and ret["changes"] else True
    return ret


def nofile_checked(name, nofile=None, limits=None):
    """
    Validate the whole tuning before anything is touched: every pillar key,
    N, paths, service and unit names, the files' contents, missing init
    scripts, and whether N can be granted here at all (a hard limit without
    CAP_SYS_RESOURCE caps it). Changes nothing. ``limits_applied`` and
    ``tuned`` run the same check themselves; this state is for SLS files of
    your own that want it as a requisite.

    nofile
        The open-file limit (pillar ``shadowsocks:tuning:nofile``).
    limits
        Paths and services (pillar ``shadowsocks:tuning:limits``).

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.nofile_checked name=check nofile=16384
    """
    ret = _limit_ret(name)
    try:
        report = __salt__["shadowsocks_tuning.nofile_check"](plan=_plan(nofile=nofile, limits=limits))
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    if report["errors"]:
        ret["comment"] = "\n".join(report["errors"] + report["notes"])
        return ret
    managed = ", ".join(report["manage"]) or "nothing installed to manage"
    ret["result"] = True
    ret["comment"] = "\n".join(
        [f"nofile {report['nofile']} ({report['init_system']}): {managed}"] + report["notes"]
    )
    return ret


def ulimit_line(name, nofile, placement="end", if_missing="fail", force=False):
    """
    Exactly one active ``ulimit -n <nofile>`` line in a shell file: a sourced
    defaults file (``placement: end``, e.g. ``/etc/default/supervisor``) or an
    init script (``placement: init``: before the daemon starts). Other lines
    stay byte for byte.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.ulimit_line name=/etc/default/supervisor nofile=16384 test=True
    """
    return _file_state(name, "shadowsocks_tuning.set_ulimit", path=name, nofile=nofile, placement=placement,
                       if_missing=if_missing, force=force)


def assignment(name, key, value, if_missing="fail", force=False):
    """
    Exactly one active ``KEY=value`` line in a shell-sourced defaults file,
    e.g. ``MAXFD=51200`` in ``/etc/default/shadowsocks-libev``.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.assignment name=/etc/default/shadowsocks-libev key=MAXFD value=16384
    """
    return _file_state(name, "shadowsocks_tuning.set_assignment", path=name, key=key, value=value,
                       if_missing=if_missing, force=force)


def supervisord_minfds(name, nofile, if_missing="fail", force=False):
    """
    ``minfds=<nofile>`` in the ``[supervisord]`` section of supervisord's
    configuration.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.supervisord_minfds name=/etc/supervisor/supervisord.conf nofile=16384
    """
    return _file_state(name, "shadowsocks_tuning.set_minfds", path=name, nofile=nofile, if_missing=if_missing,
                       force=force)


def systemd_nofile(name, nofile, if_missing="fail"):
    """
    A drop-in with ``LimitNOFILE`` of at least ``nofile`` (never below what
    the unit and its other drop-ins give) for the service unit ``name``
    (template units such as ``shadowsocks-libev-server@.service`` included).
    Pair it with ``service_restarted``, which runs ``daemon-reload``.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.systemd_nofile name=supervisor.service nofile=16384 test=True
    """
    return _file_state(name, "shadowsocks_tuning.set_systemd_nofile", unit=name, nofile=nofile,
                       if_missing=if_missing)


def service_restarted(name, pidfile=None, when=None, init_system=None, timeout=None, grace=None):
    """
    Stop the service, wait until it is gone, start it again, and fail naming
    it if it does not come back. Meant for ``onchanges`` on the file states:
    never the init script's ``restart``, which on Debian 12 only stops
    supervisor.

    name
        Service (sysvinit) or unit (systemd).
    pidfile
        The daemon's pidfile, to tell reliably whether it runs and when it is gone.
    when
        ``running`` (only a running service), ``always``, ``never``.
    init_system
        ``auto``, ``systemd`` or ``sysvinit``.
    timeout
        Seconds for the stop and for the start.
    grace
        Seconds the daemon must stay up after it started (a crash loop fails).

    Left out, ``when``, ``init_system``, ``timeout`` and ``grace`` come from
    pillar ``shadowsocks:tuning:limits``.

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.service_restarted name=supervisor pidfile=/var/run/supervisord.pid test=True
    """
    return _outcome_state(name, "shadowsocks_tuning.stop_start", "name", name,
                          pidfile=pidfile, when=when, init_system=init_system, timeout=timeout, grace=grace)


def nofile_reached(name, nofile=None, pidfiles=None, names=None, wait=None):
    """
    Check that supervisord and every shadowsocks process really run with at
    least ``nofile`` open files (``/proc/<pid>/limits``). Fails, saying why
    where it can tell, for a process still below it, e.g. one capped by a
    parent's hard limit without CAP_SYS_RESOURCE. Waits up to ``wait``
    seconds for restarted daemons; under ``test=True`` it only reports.
    Arguments left out come from pillar (``nofile``, ``limits:verify``).

    pidfiles
        Only the process trees of these daemons (default: every process found).
    names
        Process names to look for (default: supervisord and the shadowsocks programs).

    CLI Example:

    .. code-block:: bash

        salt-call state.single shadowsocks_tuning.nofile_reached name=verify nofile=16384
    """
    ret = _limit_ret(name)
    try:
        # The same whole check as every other state (the run's one plan): a
        # bad pillar or a missing target anywhere fails this one too.
        plan = _plan(nofile=nofile)
        check = __salt__["shadowsocks_tuning.nofile_check"](plan=plan)
        if check["errors"]:
            lines = check["errors"]
            if check["nofile"]:  # the pillar resolved: what the daemons run with still helps
                lines = lines + [__salt__["shadowsocks_tuning.nofile"](nofile=nofile, names=names)["comment"]]
            ret["comment"] = "\n".join(lines)
            return ret
        pidfiles = check["verify"]["pidfiles"] if pidfiles is None else pidfiles
        wait = check["verify"]["wait"] if wait is None else wait
        report = __salt__["shadowsocks_tuning.nofile"](
            nofile=nofile, names=names, pidfiles=pidfiles, wait=0 if __opts__["test"] else wait, plan=plan
        )
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret["comment"] = str(exc)
        return ret
    ret["comment"] = report["comment"]
    if report["ok"]:
        ret["result"] = True
    elif __opts__["test"]:
        ret["result"] = None
    return ret
