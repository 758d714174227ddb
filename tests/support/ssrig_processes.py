"""ssrig base: constants, errors, process/port/limit helpers, the echo server and
the counting wrapper (``CountedProcess``) that keeps floods of log lines out of files.

The two helper processes (``echo-server``, ``count-wrap``) are started as
``python ssrig.py ...``: ``THIS_FILE`` is the facade ``ssrig.py``, whose ``_main``
dispatches to ``_run_echo_server`` / ``_run_count_wrapper`` defined here.
"""

import contextlib
import ctypes
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time

# Everything here, private helpers included: the facade ssrig re-exports it with
# ``from .ssrig_processes import *``.
__all__ = [
    "resource", "HOST", "DEFAULT_METHOD", "DEFAULT_PASSWORD", "FD_ERROR_TEXT",
    "BINARY_PACKAGES", "THIS_FILE", "_SEARCH_PATH", "RigError", "MissingBinaryError",
    "PortInUseError", "DaemonExitedError", "require_binary", "link_binaries", "free_port", "port_is_free",
    "check_port_free", "is_listening", "raise_nofile_soft_limit", "read_nofile_limits",
    "read_rss_kb", "count_open_fds", "process_state", "pid_alive", "process_comm", "find_pids",
    "tail_text", "_die_with_parent", "_stop_popen", "_wait_until", "_run_echo_server",
    "EchoServer", "_run_count_wrapper", "count_wrap_argv", "read_output_status",
    "_describe_output", "CountedProcess",
]

try:
    import resource
except ImportError:  # pragma: no cover - Linux only harness
    resource = None

HOST = "127.0.0.1"
DEFAULT_METHOD = "chacha20-ietf-poly1305"
DEFAULT_PASSWORD = "ssrig-loopback-password"
FD_ERROR_TEXT = b"too many open files"  # matched case-insensitively

# binary -> Debian package that ships it
BINARY_PACKAGES = {
    "ss-server": "shadowsocks-libev",
    "ss-local": "shadowsocks-libev",
    "ss-manager": "shadowsocks-libev",
    "obfs-server": "simple-obfs",
    "obfs-local": "simple-obfs",
    "supervisord": "supervisor",
    "supervisorctl": "supervisor",
}

# The facade next to this file: run as a script it is the helper processes' entry point.
THIS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssrig.py")
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin",
     "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

class RigError(RuntimeError):
    """A part of the rig could not be started or used."""


class MissingBinaryError(RigError):
    """A needed program is not installed (message names the Debian package)."""


class PortInUseError(RigError):
    """The requested loopback port is already taken."""


class DaemonExitedError(RigError):
    """A daemon exited (or never became ready); message has its last output lines."""


# --------------------------------------------------------------------------
# small helpers: binaries, ports, limits, /proc
# --------------------------------------------------------------------------

def require_binary(name, package=None):
    """Return the absolute path of ``name`` or raise MissingBinaryError naming the package."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        package = package or BINARY_PACKAGES.get(name, "?")
        raise MissingBinaryError(
            f"{name!r} not found; install the Debian package {package!r} "
            f"(apt-get update && apt-get install -y {package})")
    return path


def link_binaries(directory, names):
    """Links to the binaries ``names`` in ``directory`` (made here), which is
    returned: a daemon started from there is found, and killed if need be, by
    that path, and the plugins it starts run from there too. Raises
    MissingBinaryError naming the package of the first one missing."""
    paths = {name: require_binary(name) for name in names}
    directory.mkdir()
    for name, path in paths.items():
        (directory / name).symlink_to(path)
    return directory


def free_port(host=HOST):
    """Return a TCP port on ``host`` that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port, host=HOST):
    """True when ``host:port`` can be bound (nothing listens or lingers there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def check_port_free(port, host=HOST, what="daemon"):
    """Raise PortInUseError when ``host:port`` is taken."""
    if not port_is_free(port, host):
        raise PortInUseError(f"cannot start {what}: {host}:{port} is already in use")


def is_listening(port):
    """True when some socket in this network namespace LISTENs on TCP ``port`` (/proc/net/tcp)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except FileNotFoundError:
            continue
    return False


def raise_nofile_soft_limit():
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def read_nofile_limits(pid):
    """Return (soft, hard) 'Max open files' of ``pid`` from /proc/<pid>/limits (None = unlimited)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line[len("Max open files"):].split()[:2]
                conv = (lambda v: None if v == "unlimited" else int(v))
                return conv(soft), conv(hard)
    raise RigError(f"no 'Max open files' line in /proc/{pid}/limits")


def read_rss_kb(pid):
    """Return VmRSS of ``pid`` in kB from /proc/<pid>/status (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def count_open_fds(pid):
    """Number of open file descriptors of ``pid`` (None if gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_state(pid):
    """One-letter state of ``pid`` from /proc ('R', 'S', 'Z', ...) or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid):
    """True when ``pid`` exists and is not a zombie."""
    return pid is not None and process_state(pid) not in (None, "Z")


def process_comm(pid):
    """/proc/<pid>/comm or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def find_pids(comm):
    """PIDs of live processes whose /proc/<pid>/comm equals ``comm`` (e.g. 'ss-server')."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_comm(int(entry)) == comm and pid_alive(int(entry)):
            pids.append(int(entry))
    return sorted(pids)


def tail_text(path, lines=20, max_bytes=64 * 1024):
    """Last ``lines`` lines of a text file ('' when missing); reads at most ``max_bytes``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _die_with_parent():
    """preexec_fn: SIGTERM this child if the harness process dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:  # best effort only
        pass


def _stop_popen(proc, timeout=5.0):
    """SIGTERM ``proc`` (a Popen), wait up to ``timeout`` s, then SIGKILL; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _wait_until(predicate, timeout, interval=0.05):
    """Poll ``predicate`` until true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# echo server
# --------------------------------------------------------------------------

def _run_echo_server(host, port):
    """Child-process body: selectors echo server; prints 'READY <port>'; exits on stdin EOF."""
    raise_nofile_soft_limit()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {lsock.getsockname()[1]}", flush=True)
    pending = {}  # sock -> bytes not yet echoed back
    emfile = 0
    while True:
        for key, mask in sel.select(timeout=1.0):
            if key.data == "stdin":
                if not os.read(key.fd, 4096):
                    return
            elif key.data == "listen":
                for _ in range(256):
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            emfile += 1
                            if emfile <= 3:
                                print(f"echo-server accept: {exc}", file=sys.stderr, flush=True)
                            time.sleep(0.01)  # never spin on EMFILE
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                conn = key.fileobj
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.recv(65536)
                    except ConnectionError:
                        data = b""
                    if not data:
                        sel.unregister(conn)
                        pending.pop(conn, None)
                        conn.close()
                        continue
                    pending[conn] = pending.get(conn, b"") + data
                if pending.get(conn):
                    try:
                        sent = conn.send(pending[conn])
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except ConnectionError:
                        sel.unregister(conn)
                        pending.pop(conn, None)
                        conn.close()
                        continue
                    pending[conn] = pending[conn][sent:]
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending[conn] else 0)
                    sel.modify(conn, events, "conn")


class EchoServer:
    """Echo server on 127.0.0.1 in a child process.  ``with EchoServer() as echo: echo.port``.

    Holds several thousand concurrent connections (selectors; the child raises its
    own soft RLIMIT_NOFILE to the hard limit).  ``port=0`` picks a free port.
    """

    def __init__(self, port=0, host=HOST, startup_timeout=10.0):
        self.host, self.port, self.startup_timeout = host, port, startup_timeout
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        if self.port:
            check_port_free(self.port, self.host, "echo server")
        self.proc = subprocess.Popen(
            [sys.executable, THIS_FILE, "echo-server", "--host", self.host, "--port", str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent, start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(self.startup_timeout)
        sel.close()
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            _stop_popen(self.proc)
            err = self.proc.stderr.read().decode(errors="replace")[-2000:]
            self.proc = None
            raise DaemonExitedError(f"echo server did not start: {line!r}\n{err}")
        self.port = int(line.split()[1])
        return self

    def stop(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # the child exits on stdin EOF
            self.proc.wait(timeout=3)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        _stop_popen(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# counting wrapper (keeps floods of log lines out of files)
# --------------------------------------------------------------------------

def _run_count_wrapper(status_path, max_seconds, argv, keep_lines=20):
    """Wrapper-process body: run ``argv`` with stdout+stderr into a pipe and count lines.

    Writes ``status_path`` (JSON, atomically, every 0.25 s at most) with: child_pid,
    lines, fd_errors (lines containing 'too many open files', any case), first_lines,
    last_lines, exited, returncode, watchdog.  Only the first ``keep_lines`` lines and a
    final summary reach the wrapper's own stdout.  SIGTERM/SIGINT/SIGHUP are forwarded
    to the child; after ``max_seconds`` (0 = never) the child is terminated (watchdog).
    The wrapper always reaps the child, so nothing is left orphaned.
    """
    rfd, wfd = os.pipe()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd)
    os.close(wfd)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    status = {"child_pid": child.pid, "argv": argv, "lines": 0, "fd_errors": 0,
              "first_lines": [], "last_lines": [], "exited": False, "returncode": None,
              "watchdog": False}

    def write_status():
        tmp = status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, status_path)

    write_status()
    deadline = time.monotonic() + max_seconds if max_seconds else None
    partial = b""
    last_write = 0.0
    dirty = False
    while True:
        ready = selectors.DefaultSelector()
        ready.register(rfd, selectors.EVENT_READ)
        events = ready.select(0.25)
        ready.close()
        if events:
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                break
            data = partial + chunk
            complete, sep, partial = data.rpartition(b"\n")
            if len(partial) > 4096:  # a runaway line without newline: count it as one
                complete, partial, sep = data, b"", b"\n"
            if sep:
                n = complete.count(b"\n") + 1
                status["lines"] += n
                status["fd_errors"] += complete.lower().count(FD_ERROR_TEXT)
                if len(status["first_lines"]) < keep_lines:
                    head = complete[:keep_lines * 512].decode("utf-8", "replace").splitlines()
                    for line in head[:keep_lines - len(status["first_lines"])]:
                        status["first_lines"].append(line[:300])
                        print(line[:300], flush=True)
                tail = complete[-keep_lines * 512:].decode("utf-8", "replace").splitlines()
                status["last_lines"] = (status["last_lines"] + [x[:300] for x in tail])[-keep_lines:]
                dirty = True
        now = time.monotonic()
        if deadline and now > deadline and not status["watchdog"]:
            status["watchdog"] = True
            dirty = True
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        if dirty and now - last_write >= 0.25:
            write_status()
            last_write, dirty = now, False
    os.close(rfd)
    try:
        rc = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        rc = child.wait()
    if partial:
        status["lines"] += 1
        status["fd_errors"] += partial.lower().count(FD_ERROR_TEXT)
    status["exited"], status["returncode"] = True, rc
    write_status()
    print(f"ssrig count-wrap: child {child.pid} exited rc={rc}; lines={status['lines']} "
          f"too_many_open_files={status['fd_errors']} watchdog={status['watchdog']}", flush=True)
    return 0 if rc == 0 else (128 - rc if rc < 0 else rc)


def count_wrap_argv(status_path, argv, max_seconds=600):
    """argv that runs ``argv`` behind the counting wrapper (see _run_count_wrapper)."""
    return [sys.executable, THIS_FILE, "count-wrap", "--status", status_path,
            "--max-seconds", str(max_seconds), "--", *argv]


def read_output_status(status_path):
    """Parsed wrapper status JSON, or {} when not written yet."""
    try:
        with open(status_path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _describe_output(status):
    if not status:
        return "(the wrapped program never started)"
    lines = status.get("last_lines") or status.get("first_lines") or []
    return (f"exited={status.get('exited')} returncode={status.get('returncode')} "
            f"lines={status.get('lines')} too_many_open_files={status.get('fd_errors')}\n"
            "last output lines:\n  " + "\n  ".join(lines or ["(none)"]))


class CountedProcess:
    """A daemon started directly (no supervisor) behind the counting wrapper.

    ``nofile``: None keeps the inherited limits; an int N sets soft=hard=N (what a
    shell's ``ulimit -n N`` does); a tuple (soft, hard) sets both explicitly.
    ``pid`` is the wrapper, ``child_pid()`` the real daemon.
    """

    def __init__(self, argv, workdir, name, nofile=None, max_seconds=600):
        self.argv, self.workdir, self.name = list(argv), workdir, name
        self.nofile, self.max_seconds = nofile, max_seconds
        self.status_path = os.path.join(workdir, f"{name}.status.json")
        self.log_path = os.path.join(workdir, f"{name}.wrapper.log")
        self.proc = None

    def _preexec(self):
        _die_with_parent()
        if self.nofile is not None:
            soft, hard = (self.nofile, self.nofile) if isinstance(self.nofile, int) else self.nofile
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                count_wrap_argv(self.status_path, self.argv, self.max_seconds),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self._preexec, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def status(self):
        return read_output_status(self.status_path)

    def child_pid(self):
        pid = self.status().get("child_pid")
        return pid if pid_alive(pid) else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def describe(self):
        return (_describe_output(self.status()) + "\nwrapper log:\n  "
                + tail_text(self.log_path, 10).replace("\n", "\n  "))

    def stop(self):
        _stop_popen(self.proc)
        self.proc = None
