"""
Services: stop a daemon, wait until it is really gone, start it, and wait
until it runs again, so that it comes back with the open-file limit now
configured. Never the init script's ``restart``: Debian 12's
``/etc/init.d/supervisor restart`` only stops supervisord. Under systemd:
``restart`` (``try-restart`` for template units), after ``daemon-reload``
only where systemd has not read the unit's files yet.
"""

import contextlib
import functools
import os
import re
import select
import shutil
import subprocess
import time

from salt.exceptions import CommandExecutionError

import sstuning_ports as ports
import sstuning_procfs as procfs
import sstuning_daemons as daemons
import sstuning_journal as journal
from sstuning_settings import LIMITS, OPTIONS

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What `service` gives an init script: no variables of the salt process leak in.
SERVICE_ENV = {"PATH": SYSTEM_PATH, "LANG": "C"}


def run_service(argv, timeout):
    """Run one service command with a clean environment; returns (rc, output).
    Output is read through a pipe and kept short; a daemon that keeps the pipe
    open cannot hold this up, as reading stops once the command has exited."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(SERVICE_ENV), close_fds=True, start_new_session=True,
        )
    except OSError as exc:
        raise CommandExecutionError(f"cannot run {' '.join(argv)}: {exc.strerror or exc}")
    kept = bytearray()
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)

    def read():
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return None
        kept.extend(chunk[: max(0, 16384 - len(kept))])
        return chunk

    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise CommandExecutionError(f"`{' '.join(argv)}` did not finish within {timeout} s; it was killed")
            if select.select([fd], [], [], 0.1)[0] and read() == b"":
                # Every writer closed the pipe: just wait for the command itself.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The command has exited: take what is already in the pipe, without
        # waiting for a daemon that still holds it (and may write forever).
        for _ in range(64):
            if not select.select([fd], [], [], 0)[0] or not read():
                break
    finally:
        proc.stdout.close()
    return proc.returncode, kept.decode("utf-8", "replace").strip()


def _service_argv(opts, name, action):
    init_dir = opts["init_dir"]
    script = os.path.join(init_dir, name)
    if not os.path.isfile(script):
        raise CommandExecutionError(
            f"service {name}: no init script {script}; install the service, or fix its name in pillar {LIMITS}"
        )
    service = shutil.which(opts["service_cmd"], path=SYSTEM_PATH)
    if init_dir == OPTIONS["init_dir"] and service:
        return [service, name, action]
    return [script, action]


# Debian's init scripts name their program in a `DAEMON=/usr/bin/supervisord` line.
_DAEMON_LINE = re.compile(r"^\s*DAEMON=[\"']?([^\"'\s#;]+)", re.MULTILINE)


def daemon_names(opts, name):
    """The names the daemon of service ``name`` may run under: the program of
    its init script's ``DAEMON=`` line, else the service's own name,
    supervisord or a shadowsocks program."""
    with contextlib.suppress(OSError, journal.NotRegularFile):
        found = _DAEMON_LINE.search(journal.read_text(os.path.join(opts["init_dir"], name), 1 << 20) or "")
        if found:
            return {os.path.basename(found.group(1))}
    return {name} | daemons.program_names()


def _pidfile_daemon(opts, name, pidfile):
    """(pid, None) when ``pidfile`` names a live process that is the daemon
    of ``name``; (None, why) when it names another program (a stale pidfile
    whose pid was reused: never signalled, never waited for); (None, None)."""
    pid = procfs.pid_from(pidfile)
    stat = procfs.proc_stat(pid) if pid else None
    if stat is None or stat[1] == "Z":
        return None, None
    names = daemon_names(opts, name)
    if procfs.match_name(stat[0], functools.partial(procfs.proc_argv, pid), names):
        return pid, None
    return None, (f"{pidfile} names pid {pid}, which runs {stat[0]}, not {' or '.join(sorted(names)[:4])}: "
                  "a stale pidfile; that process was left alone")


def _sysv_running(opts, name, pidfile):
    """The daemon's pid (from its pidfile), True (status exit 0), or None."""
    if pidfile:
        return _pidfile_daemon(opts, name, pidfile)[0]
    rc, _ = run_service(_service_argv(opts, name, "status"), 30)
    return True if rc == 0 else None


def _sysv_stopped(opts, name, pidfile, old):
    if isinstance(old, int) and not isinstance(old, bool):
        stat = procfs.proc_stat(old)
        # A zombie still named by its pidfile makes start-stop-daemon think it runs.
        return stat is None or (stat[1] == "Z" and procfs.pid_from(pidfile) != old)
    return _sysv_running(opts, name, pidfile) is None


def wait_for(predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _describe_run(argv, rc, output):
    return f"`{' '.join(argv)}` exited {rc}" + (f": {output[-600:]}" if output else "")


def _cut(pid):
    """What stopping the daemon ``pid`` cuts, for the comment."""
    if not isinstance(pid, int) or isinstance(pid, bool):
        return "live connections not counted (no pidfile)"
    count = ports.live_connections(pid)
    return f"{count} live TCP connection(s) of its processes cut" if count else "no live TCP connection cut"


def _stays_up(running, grace):
    """Poll ``running()`` for ``grace`` seconds: False as soon as it is not
    running (a daemon that dies right after it started: a crash loop)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not running():
            return False
        time.sleep(0.2)
    return bool(running())


def sysv_stop_start(opts, name, pidfile, when, timeout, grace, test):
    pid, stale = _pidfile_daemon(opts, name, pidfile) if pidfile else (None, None)
    running = pid if pidfile else _sysv_running(opts, name, None)
    old = f"running (pid {running})" if running not in (None, True) else ("running" if running else "stopped")
    result = {"name": name, "changed": False, "old": old, "new": old}
    note = f" ({stale})" if stale else ""
    if when == "never":
        result["comment"] = f"{name}: restart is off (restart: never); stop and start it yourself for the new limit"
        return result
    if running is None and when == "running":
        result["comment"] = f"{name} is not running: left stopped (it gets the new limit when it starts){note}"
        return result
    cut = _cut(running) if running is not None else "it was not running"
    if test:
        result.update(changed=True, new="stopped and started",
                      comment=f"{name} would be stopped and started (service {name} stop, then start): "
                              f"{cut.replace(' cut', ' would be cut')}{note}")
        return result
    # On record before the stop: a run killed between stop and start leaves
    # the service down, and the next run must know to start it.
    journal.begin_restart(opts["state_dir"], name, "sysvinit", pidfile, time.time())
    if running is not None:
        argv = _service_argv(opts, name, "stop")
        rc, output = run_service(argv, timeout)
        if rc != 0:
            raise CommandExecutionError(
                f"service {name} could not be stopped: {_describe_run(argv, rc, output)}; it still runs with its old limit"
            )
        if not wait_for(lambda: _sysv_stopped(opts, name, pidfile, running), timeout):
            raise CommandExecutionError(
                f"service {name} still runs {timeout} s after `stop`; not started again, check it by hand"
            )
    argv = _service_argv(opts, name, "start")
    rc, output = run_service(argv, timeout)
    if rc != 0:
        raise CommandExecutionError(f"service {name} failed to start: {_describe_run(argv, rc, output)}")
    now = wait_for(lambda: _sysv_running(opts, name, pidfile), timeout)
    if not now:
        raise CommandExecutionError(
            f"service {name} failed to start: not running {timeout} s after {_describe_run(argv, rc, output)}"
            f"{note}"
        )
    if not _stays_up(lambda: _sysv_running(opts, name, pidfile), grace):
        raise CommandExecutionError(
            f"service {name} started (pid {now}) but did not stay up for {grace} s: it dies right after it starts "
            f"(a crash loop?); it does not run now: see its log ({cut})"
        )
    journal.end_restart(opts["state_dir"], name)
    result.update(changed=True, new=f"running (pid {now})" if now is not True else "running",
                  comment=f"{name} stopped and started: {cut}{note}")
    return result


def finish(opts, pending, timeout, grace, test):
    """Start the services an earlier run stopped and did not start again
    (it was killed between the two): ``[result]``; raises naming the service
    when one does not come back."""
    out = []
    for item in pending:
        name, pidfile = item["name"], item.get("pidfile")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item.get("since") or 0))
        running = _sysv_running(opts, name, pidfile)
        if running:
            if not test:
                journal.end_restart(opts["state_dir"], name)
            out.append({"name": name, "changed": False, "old": "running", "new": "running",
                        "comment": f"{name}: the restart begun at {since} was finished by someone: it runs"})
            continue
        if test:
            out.append({"name": name, "changed": True, "old": "stopped", "new": "running",
                        "comment": f"{name} would be started: a run at {since} stopped it and did not start it again"})
            continue
        argv = _service_argv(opts, name, "start")
        rc, output = run_service(argv, timeout)
        now = wait_for(lambda: _sysv_running(opts, name, pidfile), timeout) if rc == 0 else None
        if not now or not _stays_up(lambda: _sysv_running(opts, name, pidfile), grace):
            raise CommandExecutionError(
                f"service {name} is still down: a run at {since} stopped it and did not start it again, and "
                f"starting it now failed ({_describe_run(argv, rc, output)}); see its log, start it by hand, then "
                f"run again")
        journal.end_restart(opts["state_dir"], name)
        out.append({"name": name, "changed": True, "old": "stopped", "new": f"running (pid {now})",
                    "comment": f"{name} started: a run at {since} stopped it and did not start it again"})
    return out


def find_systemctl(opts):
    """The systemctl binary of minion option ``systemctl``, or None."""
    return shutil.which(opts["systemctl"], path=SYSTEM_PATH)


def _systemctl(opts):
    binary = find_systemctl(opts)
    if binary is None:
        raise CommandExecutionError("systemctl not found, although systemd was chosen (pillar "
                                    f"{LIMITS}:init_system); set it to sysvinit or auto")
    return binary


def systemd_reload(opts, timeout):
    """``systemctl daemon-reload``: systemd reads changed drop-ins."""
    argv = [_systemctl(opts), "daemon-reload"]
    rc, output = run_service(argv, timeout)
    if rc != 0:
        raise CommandExecutionError(f"the drop-ins were written, but {_describe_run(argv, rc, output)}")


def _main_pid(systemctl, unit, timeout):
    rc, output = run_service([systemctl, "show", "--property=MainPID", "--value", "--", unit], timeout)
    return int(output) if rc == 0 and output.isdigit() and int(output) > 0 else None


def _start_limit(systemctl, unit, timeout):
    """What to say when systemd refused the start for its rate limit (a
    restart has stopped the unit by then: it is down)."""
    rc, output = run_service([systemctl, "show", "--property=Id,Result,ActiveState", "--", unit], timeout)
    hit = [block for block in output.split("\n\n") if "Result=start-limit-hit" in block] if rc == 0 else []
    if not hit:
        return ""
    names = [line.split("=", 1)[1] for block in hit for line in block.splitlines() if line.startswith("Id=")]
    return (f"; systemd refused to start {', '.join(names) or unit} again (start-limit-hit: started more than "
            "StartLimitBurst times within StartLimitIntervalSec), so it is DOWN now: run systemctl reset-failed "
            f"{' '.join(names) or unit} and systemctl start it, then run this again")


def _needs_reload(systemctl, unit, timeout):
    """Whether systemd has not read the unit's files since they changed
    (``NeedDaemonReload``; for a pattern, any instance)."""
    rc, output = run_service([systemctl, "show", "--property=NeedDaemonReload", "--", unit], timeout)
    return rc != 0 or "NeedDaemonReload=yes" in output


def systemd_restart(opts, unit, when, timeout, grace, test):
    template = unit.endswith("@.service")
    target = unit[: -len("@.service")] + "@*.service" if template else unit
    result = {"name": unit, "changed": False, "old": None, "new": None}
    if when == "never":
        result["comment"] = f"{unit}: restart is off (restart: never); run systemctl daemon-reload and restart it yourself"
        return result
    systemctl = _systemctl(opts)
    # daemon-reload only where systemd has not read the files: in systemd 252
    # a reload also resets every unit's start rate limit (StartLimitBurst),
    # which would hide a crash loop from systemd and from this restart.
    reload = [[systemctl, "daemon-reload"]] if _needs_reload(systemctl, target, timeout) else []
    if when == "running" and not template:
        rc, _ = run_service([systemctl, "is-active", "--quiet", "--", unit], timeout)
        if rc != 0:
            for argv in [] if test else reload:
                rc, output = run_service(argv, timeout)
                if rc != 0:
                    raise CommandExecutionError(f"{unit}: {_describe_run(argv, rc, output)}")
            result["comment"] = f"{unit} is not active: left stopped (it gets the new limit when it starts)" + (
                "; systemd reloaded" if reload else "")
            return result
    # A template's instances are matched by pattern; only loaded (running) ones restart.
    action = "try-restart" if when == "running" or template else "restart"
    commands = reload + [[systemctl, action, "--", target]]
    # A template's instances are many processes: their connections are not counted.
    cut = "live connections not counted (template unit)" if template else _cut(_main_pid(systemctl, unit, timeout))
    if test:
        result.update(changed=True, new="restarted",
                      comment=f"would run: {'; '.join(' '.join(c[1:]) for c in commands)}: "
                              f"{cut.replace(' cut', ' would be cut')}")
        return result
    for argv in commands:
        rc, output = run_service(argv, timeout)
        if rc != 0:
            raise CommandExecutionError(f"{unit} failed to restart: {_describe_run(argv, rc, output)}"
                                        + _start_limit(systemctl, target, timeout))
    active = [systemctl, "is-active", "--quiet", "--", unit]
    if not template and not _stays_up(lambda: run_service(active, timeout)[0] == 0, grace):
        raise CommandExecutionError(
            f"{unit} restarted but did not stay active for {grace} s: it dies right after it starts (a crash "
            f"loop?): see systemctl status {unit}"
        )
    done = "daemon-reload, " if reload else ""
    result.update(changed=True, new="restarted", comment=f"{target}: {done}{action}: {cut}")
    return result


