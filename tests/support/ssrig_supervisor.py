"""ssrig supervisord parts: ``SsServerProgram`` (ss-server behind the counting wrapper,
as a supervisord program), ``PrivateSupervisor`` (a private supervisord in a temp dir),
``FileGuard`` (byte-for-byte file snapshots) and ``SystemSupervisor`` (Debian's real
``/etc/init.d/supervisor``).

Observed here (Debian 12, supervisor 4.2.5-1, shadowsocks-libev 3.3.5, hard
RLIMIT_NOFILE 20000, no CAP_SYS_RESOURCE, PID 1 is not systemd):

* /etc/init.d/supervisor sources /etc/default/supervisor with ``.`` *before* its
  ``set -e``, in dash.  ``ulimit -n N`` there sets soft *and* hard to N for
  supervisord and every program (ss-server inherits it).  A value above the hard
  limit (``ulimit -n 51200``) prints ``/etc/init.d/supervisor: 12: ulimit: error
  setting limit (Operation not permitted)`` on stderr, the script goes on and exits
  0, and the daemon keeps the inherited 20000/20000.  The line is also run (and
  errors) on ``stop``.
* ``init stop`` only sends SIGTERM and returns at once; supervisord is still alive
  (stopping its programs).  An immediate ``init start`` then sees it running,
  exits 1 printing just "Starting supervisor: ", and a moment later supervisord is
  gone: back-to-back stop/start leaves supervisor DOWN.  ``SystemSupervisor.stop``
  waits until the pid is gone.
* ``init restart`` stops (with --retry, waiting) and never starts; exits 0.  If the
  old daemon lingers as a zombie, start-stop-daemon counts it as alive: restart
  then takes 35 s (TERM/30/KILL/5) and exits 2.  PID 1 here reaps orphans only
  every second or so, so a stopped daemonized supervisord shows as
  ``[supervisord] <defunct>`` for ~1-2 s.
* supervisord ``minfds`` raises its *soft* limit to minfds when the hard limit
  allows (logs "Increased RLIMIT_NOFILE limit to N"; ss-server inherits it); above
  the hard limit supervisord refuses to start (exit 2) with a message that
  misleadingly says the environment "will only allow you to open <minfds>".
* ``ss-server -n N`` sets its own soft and hard to N when N <= hard; otherwise it
  logs "insufficient permission to change NOFILE" and keeps the inherited limit.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time

if __package__:  # support.ssrig_supervisor (pytest: tests/ on sys.path)
    from .ssrig_processes import (
        DEFAULT_METHOD, DEFAULT_PASSWORD, HOST, DaemonExitedError, MissingBinaryError, RigError,
        _describe_output, _die_with_parent, _stop_popen, _wait_until, check_port_free, count_wrap_argv,
        free_port, is_listening, pid_alive, process_comm, process_state, read_nofile_limits,
        read_output_status, require_binary, tail_text)
else:  # tests/support itself on sys.path: bench/capacity, ssrig_demo.py, `python ssrig.py ...`
    from ssrig_processes import (
        DEFAULT_METHOD, DEFAULT_PASSWORD, HOST, DaemonExitedError, MissingBinaryError, RigError,
        _describe_output, _die_with_parent, _stop_popen, _wait_until, check_port_free, count_wrap_argv,
        free_port, is_listening, pid_alive, process_comm, process_state, read_nofile_limits,
        read_output_status, require_binary, tail_text)

# Everything here, private helpers included: the facade ssrig re-exports it with
# ``from .ssrig_supervisor import *``.
__all__ = [
    "SsServerProgram", "_shell_word", "_ulimit_shell", "PrivateSupervisor", "FileGuard",
    "SystemSupervisor",
]


# --------------------------------------------------------------------------
# ss-server as a supervisord program
# --------------------------------------------------------------------------

class SsServerProgram:
    """ss-server (behind the counting wrapper) described as a supervisord program.

    ``supervisor_section()`` gives the ``[program:NAME]`` text; the wrapper's
    status JSON and log live in ``workdir``.  ``pid()`` is the real ss-server.
    """

    def __init__(self, workdir, port=None, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 name="ssrig-ss-server", max_seconds=600, extra_args=()):
        self.ss_server = require_binary("ss-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.password, self.method, self.name = password, method, name
        self.max_seconds, self.extra_args = max_seconds, list(extra_args)
        self.status_path = os.path.join(workdir, f"{name}.status.json")
        self.log_path = os.path.join(workdir, f"{name}.log")

    def argv(self):
        """The ss-server command line (without wrapper)."""
        return [self.ss_server, "-s", HOST, "-p", str(self.port), "-k", self.password,
                "-m", self.method, *self.extra_args]

    def supervisor_section(self):
        """``[program:NAME]`` text; output goes only through the counting wrapper."""
        command = " ".join(_shell_word(a) for a in count_wrap_argv(
            self.status_path, self.argv(), self.max_seconds))
        return "\n".join([
            f"[program:{self.name}]",
            "command=" + command.replace("%", "%%"),
            "autostart=true",
            "autorestart=false",
            "startsecs=1",
            "startretries=0",
            "stopasgroup=true",
            "killasgroup=true",
            "stopwaitsecs=5",
            "redirect_stderr=true",
            f"stdout_logfile={self.log_path}",
            "stdout_logfile_maxbytes=1MB",
            "stdout_logfile_backups=0",
            "",
        ])

    def reset(self):
        """Forget the previous run's status (call before (re)starting the program)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_path)

    def status(self):
        """Wrapper status dict (lines, fd_errors, first/last lines, exited, ...)."""
        return read_output_status(self.status_path)

    def pid(self):
        """PID of the running ss-server (None when not running)."""
        pid = self.status().get("child_pid")
        return pid if pid_alive(pid) and process_comm(pid) == "ss-server" else None

    def nofile_limits(self):
        """(soft, hard) 'Max open files' of the running ss-server."""
        pid = self.pid()
        if pid is None:
            raise RigError("ss-server is not running\n" + _describe_output(self.status()))
        return read_nofile_limits(pid)

    def fd_error_count(self):
        """'too many open files' lines ss-server has written so far (0.25 s lag)."""
        return self.status().get("fd_errors", 0)

    def wait_ready(self, timeout, owner_alive=lambda: True, owner_info=lambda: ""):
        """Wait until ss-server listens on its port; raise DaemonExitedError otherwise."""
        deadline = time.monotonic() + timeout
        reason = f"did not listen within {timeout} s"
        while time.monotonic() < deadline:
            if self.status().get("exited"):
                reason = "exited early"
                break
            if self.pid() and is_listening(self.port):
                return self.pid()
            if not owner_alive():
                reason = "not started: its supervisord exited early"
                break
            time.sleep(0.05)
        raise DaemonExitedError(
            f"ss-server on {HOST}:{self.port} {reason}\n"
            + _describe_output(self.status()) + "\n"
            + "program log:\n  " + tail_text(self.log_path, 10).replace("\n", "\n  ")
            + owner_info())


def _shell_word(word):
    """Quote for supervisord's shlex-style command parsing."""
    if word and all(c.isalnum() or c in "@%+=:,./-_" for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _ulimit_shell(nofile):
    """sh fragment for ``nofile`` (int -> 'ulimit -n N', tuple -> -Hn/-Sn, None -> '')."""
    if nofile is None:
        return ""
    if isinstance(nofile, int):
        return f"ulimit -n {nofile}; "
    soft, hard = nofile
    return f"ulimit -Hn {hard}; ulimit -Sn {soft}; "


class PrivateSupervisor:
    """A private supervisord running ss-server, all state in a temp dir.

    ``nofile``  - applied by ``sh -c 'ulimit -n N; exec supervisord -n -c CONF'``
                  exactly like a line in /etc/default/supervisor: an int sets soft
                  *and* hard (dash semantics), a (soft, hard) tuple sets them apart,
                  None inherits the harness's limits.  A failing ulimit (e.g. above
                  the hard limit) prints an error and supervisord starts anyway.
    ``minfds``  - supervisord's ``minfds`` (None = its default, 1024).  supervisord
                  raises its *soft* limit to minfds when the hard limit allows, and
                  refuses to start otherwise (DaemonExitedError with its message).
    Attributes: ``ss`` (SsServerProgram), ``port``, ``pid`` (supervisord), ``tempdir``.
    """

    def __init__(self, nofile=None, minfds=None, port=None, password=DEFAULT_PASSWORD,
                 method=DEFAULT_METHOD, startup_timeout=10.0, max_seconds=600,
                 extra_ss_args=()):
        self.nofile, self.minfds, self.startup_timeout = nofile, minfds, startup_timeout
        self.supervisord = require_binary("supervisord")
        self.supervisorctl = require_binary("supervisorctl")
        require_binary("ss-server")
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-sup-")
        self.tempdir = self._tmp.name
        self.ss = SsServerProgram(self.tempdir, port=port, password=password, method=method,
                                  max_seconds=max_seconds, extra_args=extra_ss_args)
        self.conf_path = os.path.join(self.tempdir, "supervisord.conf")
        self.sock_path = os.path.join(self.tempdir, "supervisor.sock")
        self.log_path = os.path.join(self.tempdir, "supervisord.log")
        self.stderr_path = os.path.join(self.tempdir, "supervisord.stderr")
        self.proc = None

    @property
    def port(self):
        return self.ss.port

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def config_text(self):
        minfds = f"minfds={self.minfds}\n" if self.minfds is not None else ""
        user = "user=root\n" if os.geteuid() == 0 else ""  # silences a CRIT line
        return (
            f"[unix_http_server]\nfile={self.sock_path}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={self.log_path}\nlogfile_maxbytes=1MB\nlogfile_backups=0\n"
            f"pidfile={os.path.join(self.tempdir, 'supervisord.pid')}\n"
            f"childlogdir={self.tempdir}\nnodaemon=true\nsilent=true\n{user}{minfds}\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{self.sock_path}\n\n"
            + self.ss.supervisor_section())

    def start(self):
        """Write the config, start supervisord under ``nofile``, wait for ss-server to listen."""
        try:
            check_port_free(self.port, what="ss-server")
            with open(self.conf_path, "w") as f:
                f.write(self.config_text())
            self.ss.reset()
            script = f"{_ulimit_shell(self.nofile)}exec {self.supervisord} -n -c {self.conf_path}"
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    ["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, preexec_fn=_die_with_parent, start_new_session=True)
            self.ss.wait_ready(self.startup_timeout, owner_alive=lambda: self.proc.poll() is None,
                               owner_info=self._describe)
        except BaseException:
            self.stop()
            raise
        return self

    def _describe(self):
        rc = self.proc.poll() if self.proc else None
        return (f"\nsupervisord (rc={rc}) stderr:\n  "
                + tail_text(self.stderr_path, 10).replace("\n", "\n  ")
                + "\nsupervisord log:\n  " + tail_text(self.log_path, 10).replace("\n", "\n  "))

    def ctl(self, *args, timeout=15):
        """Run supervisorctl against this supervisord; returns CompletedProcess (text)."""
        return subprocess.run([self.supervisorctl, "-c", self.conf_path, *args],
                              capture_output=True, text=True, timeout=timeout)

    def supervisord_nofile_limits(self):
        """(soft, hard) 'Max open files' of supervisord itself."""
        return read_nofile_limits(self.pid)

    def stop(self):
        """Stop supervisord (it stops ss-server) and remove the temp dir."""
        if self.proc is not None:
            _stop_popen(self.proc, timeout=15)
            self.proc = None
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# the system supervisord through Debian's init script
# --------------------------------------------------------------------------

class FileGuard:
    """Snapshot files (content, mode, owner, times, or absence); ``restore()`` puts them back
    byte for byte (rewriting in place, so the inode stays) or deletes files that did not
    exist, then resets the times of directories given to ``guard_dir_times()``."""

    def __init__(self):
        self._saved = {}
        self._dir_times = {}

    def guard_dir_times(self, path):
        """Remember a directory's atime/mtime (changed when files appear/vanish in it)."""
        st = os.stat(path)
        self._dir_times.setdefault(os.path.abspath(path), (st.st_atime_ns, st.st_mtime_ns))

    def guard(self, path, max_bytes=16 << 20):
        """Snapshot ``path`` (no-op if already guarded).  Files above ``max_bytes`` are
        treated as append-only logs: only their length is kept and restore truncates."""
        path = os.path.abspath(path)
        if path in self._saved:
            return
        try:
            st = os.stat(path)
            if st.st_size > max_bytes:
                self._saved[path] = (st.st_size, st)
            else:
                with open(path, "rb") as f:
                    self._saved[path] = (f.read(), st)
        except FileNotFoundError:
            self._saved[path] = None

    def is_guarded(self, path):
        return os.path.abspath(path) in self._saved

    def restore(self):
        for path, saved in self._saved.items():
            if saved is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            data, st = saved
            if isinstance(data, int):  # big append-only log: cut what was appended
                os.truncate(path, data)
            else:
                with open(path, "wb") as f:
                    f.write(data)
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        for path, times in self._dir_times.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, ns=times)

    def changed(self):
        """Guarded paths whose current state differs from the snapshot."""
        out = []
        for path, saved in self._saved.items():
            try:
                with open(path, "rb") as f:
                    now = f.read()
            except FileNotFoundError:
                now = None
            if saved and isinstance(saved[0], int):
                if now is None or len(now) != saved[0]:
                    out.append(path)
            elif now != (saved[0] if saved else None):
                out.append(path)
        return out


class SystemSupervisor:
    """Debian's real supervisord via ``/etc/init.d/supervisor``, running ss-server.

    On enter: remembers whether supervisord runs; snapshots /etc/default/supervisor,
    the temporary program file ``/etc/supervisor/conf.d/<program>.conf`` (absent) and
    every file in /var/log/supervisor; writes the program file; appends
    ``defaults_lines`` (e.g. ``["ulimit -n 16384"]``) to /etc/default/supervisor; then,
    if ``start``, stops supervisord (waiting until it is really gone) and starts it.
    On exit: stops it, restores every snapshotted file byte for byte (and any extra
    path passed to ``guard()``), then starts it again only if it was running before.

    Init-script behaviour observed on Debian 12: see the module docstring.
    """

    INIT_SCRIPT = "/etc/init.d/supervisor"
    DEFAULTS = "/etc/default/supervisor"
    CONF_D = "/etc/supervisor/conf.d"
    PIDFILE = "/var/run/supervisord.pid"
    LOG_DIR = "/var/log/supervisor"

    def __init__(self, port=None, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 defaults_lines=(), start=True, startup_timeout=15.0, max_seconds=600,
                 extra_ss_args=()):
        if not os.access(self.INIT_SCRIPT, os.X_OK):
            raise MissingBinaryError(f"{self.INIT_SCRIPT} missing; install the Debian package 'supervisor'")
        require_binary("supervisord")
        require_binary("ss-server")
        self.defaults_lines, self.auto_start = list(defaults_lines), start
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-syssup-")
        self.tempdir = self._tmp.name
        name = f"ssrig-{os.getpid()}-{os.path.basename(self.tempdir)[-8:]}"
        name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
        self.ss = SsServerProgram(self.tempdir, port=port, password=password, method=method,
                                  name=name, max_seconds=max_seconds, extra_args=extra_ss_args)
        self.program_path = os.path.join(self.CONF_D, f"{name}.conf")
        self.files = FileGuard()
        self.was_running = None
        self.init_log = []  # (action, returncode, stdout, stderr) of every init-script call

    @property
    def port(self):
        return self.ss.port

    # -- init script -------------------------------------------------------
    def init_script(self, action, timeout=60):
        """Run ``/etc/init.d/supervisor ACTION`` with a clean env like ``service`` does."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": os.environ.get("LANG", "C")}
        result = subprocess.run([self.INIT_SCRIPT, action], capture_output=True, text=True,
                                env=env, timeout=timeout)
        self.init_log.append((action, result.returncode, result.stdout, result.stderr))
        return result

    def supervisord_pid(self):
        """PID from /var/run/supervisord.pid when that process is a live supervisord."""
        try:
            with open(self.PIDFILE) as f:
                pid = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except FileNotFoundError:
            return None
        return pid if b"supervisord" in cmdline and pid_alive(pid) else None

    def is_running(self):
        return self.supervisord_pid() is not None

    def supervisord_nofile_limits(self):
        pid = self.supervisord_pid()
        if pid is None:
            raise RigError("system supervisord is not running")
        return read_nofile_limits(pid)

    def stop(self, timeout=30.0):
        """``init stop`` and wait until the daemon is really gone (init stop does not wait)."""
        pid = self.supervisord_pid()
        result = self.init_script("stop")
        if pid and not _wait_until(lambda: not pid_alive(pid), timeout):
            raise RigError(f"supervisord {pid} still alive {timeout} s after 'stop'")
        return result

    def start(self, wait_program=True):
        """``init start``; then (optionally) wait until our ss-server listens."""
        self.ss.reset()
        result = self.init_script("start")
        if not _wait_until(self.is_running, 5):
            raise DaemonExitedError(
                f"{self.INIT_SCRIPT} start failed (rc={result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}\nsupervisord log:\n  "
                + tail_text(os.path.join(self.LOG_DIR, "supervisord.log"), 10).replace("\n", "\n  "))
        if wait_program:
            self.ss.wait_ready(self.startup_timeout, owner_alive=self.is_running,
                               owner_info=lambda: "\ninit start: " + result.stdout + result.stderr)
        return result

    def restart(self):
        """stop (waiting until gone) then start: what Debian's 'restart' should have been."""
        self.stop()
        return self.start()

    def guard(self, path):
        """Snapshot another file now; it is restored byte for byte on exit."""
        self.files.guard(path)

    def _log_files(self):
        if not os.path.isdir(self.LOG_DIR):
            return []
        paths = (os.path.join(self.LOG_DIR, e) for e in os.listdir(self.LOG_DIR))
        return [p for p in paths if os.path.isfile(p)]

    # -- context -----------------------------------------------------------
    def __enter__(self):
        self.was_running = self.is_running()
        try:
            if os.path.exists(self.program_path):
                raise RigError(f"{self.program_path} already exists")
            check_port_free(self.port, what="ss-server")
        except BaseException:
            self._tmp.cleanup()
            raise
        for path in (self.DEFAULTS, self.program_path):
            self.files.guard(path)
        for path in self._log_files():
            self.files.guard(path)
        for path in (self.CONF_D, self.LOG_DIR):
            if os.path.isdir(path):
                self.files.guard_dir_times(path)
        try:
            with open(self.program_path, "w") as f:
                f.write(self.ss.supervisor_section())
            if self.defaults_lines:
                with open(self.DEFAULTS, "a") as f:
                    f.write("\n".join(self.defaults_lines) + "\n")
            if self.auto_start:
                if self.was_running:
                    self.stop()
                self.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        try:
            pid = self.supervisord_pid()
            if pid:
                self.stop()
                # PID 1 here reaps orphans only every second or so: wait (bounded)
                # until the zombie is gone so 'ps' shows nothing left behind.
                _wait_until(lambda: process_state(pid) is None, 5)
            for path in self._log_files():  # created by supervisord while we ran
                if not self.files.is_guarded(path):
                    os.unlink(path)
            self.files.restore()
            if self.was_running:
                self.start(wait_program=False)
        finally:
            self._tmp.cleanup()
