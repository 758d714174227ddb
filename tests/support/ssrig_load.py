"""ssrig client side: ``SsLocal`` (ss-local, SOCKS5 on loopback), ``socks5_ramp()``
(K concurrent SOCKS5 CONNECTs through it, all held open at once, each checked by echo)
and ``HeldConnections`` (what a ramp with ``keep=True`` leaves open: each checked
again by echo later, e.g. after the daemon's limit was raised under them)."""

import contextlib
import errno
import selectors
import socket
import tempfile
import time

if __package__:  # support.ssrig_load (pytest: tests/ on sys.path)
    from .ssrig_processes import (
        DEFAULT_METHOD, DEFAULT_PASSWORD, HOST, CountedProcess, DaemonExitedError, _wait_until,
        check_port_free, count_open_fds, free_port, is_listening, raise_nofile_soft_limit,
        read_nofile_limits, read_rss_kb, require_binary, resource)
else:  # tests/support itself on sys.path: bench/capacity, ssrig_demo.py, `python ssrig.py ...`
    from ssrig_processes import (
        DEFAULT_METHOD, DEFAULT_PASSWORD, HOST, CountedProcess, DaemonExitedError, _wait_until,
        check_port_free, count_open_fds, free_port, is_listening, raise_nofile_soft_limit,
        read_nofile_limits, read_rss_kb, require_binary, resource)

# Everything here, private helpers included: the facade ssrig re-exports it with
# ``from .ssrig_load import *``.
__all__ = [
    "SsLocal", "_CONNECTING", "_GREETING", "_REQUEST", "_ECHO", "_HELD", "_FAILED",
    "_SOCKS5_GREETING", "_RampFailure", "_Conn", "socks5_ramp", "HeldConnections",
]


# --------------------------------------------------------------------------
# ss-local
# --------------------------------------------------------------------------

class SsLocal:
    """ss-local (SOCKS5 on 127.0.0.1) pointing at an ss-server on ``server_port``.

    Output goes through the counting wrapper.  ``nofile`` as in CountedProcess;
    the default raises soft to hard so ss-local (2 fds per connection) is never
    the bottleneck.  Attributes: ``port`` (SOCKS5), ``pid()`` (real ss-local).
    """

    def __init__(self, server_port, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 port=None, nofile="hard", startup_timeout=5.0, max_seconds=600):
        self.binary = require_binary("ss-local")
        self.server_port, self.password, self.method = server_port, password, method
        self.port = port or free_port()
        if nofile == "hard":
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            nofile = None if hard == resource.RLIM_INFINITY else (hard, hard)
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-local-")
        self.proc = CountedProcess(
            [self.binary, "-s", HOST, "-p", str(server_port), "-b", HOST, "-l", str(self.port),
             "-k", password, "-m", method],
            self._tmp.name, "ss-local", nofile=nofile, max_seconds=max_seconds)

    def pid(self):
        return self.proc.child_pid()

    def fd_error_count(self):
        return self.proc.status().get("fd_errors", 0)

    def start(self):
        try:
            check_port_free(self.port, what="ss-local")
            self.proc.start()
            ok = _wait_until(lambda: (self.pid() and is_listening(self.port))
                             or not self.proc.alive() or self.proc.status().get("exited"),
                             self.startup_timeout)
            if not (ok and self.pid() and is_listening(self.port)):
                raise DaemonExitedError(
                    f"ss-local on {HOST}:{self.port} did not become ready\n" + self.proc.describe())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self.proc.stop()
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# SOCKS5 client ramp
# --------------------------------------------------------------------------

_CONNECTING, _GREETING, _REQUEST, _ECHO, _HELD, _FAILED = range(6)
_SOCKS5_GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication


class _RampFailure(Exception):
    """One connection failed; the argument is the reason counted in 'failures'."""


class _Conn:
    """One client connection of the ramp: a small SOCKS5 + echo state machine."""

    def __init__(self, sock, request, payload):
        self.sock, self.request, self.payload = sock, request, payload
        self.state, self.out, self.inbuf = _CONNECTING, b"", b""

    def events(self):
        return selectors.EVENT_WRITE if self.state == _CONNECTING or self.out else selectors.EVENT_READ

    def send_pending(self):
        if self.out:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self.out = self.out[self.sock.send(self.out):]

    def step(self, mask):
        """Handle one readiness event; return True when the state advanced."""
        if self.state == _CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise _RampFailure(f"connect_{errno.errorcode.get(err, err)}")
            self.state, self.out = _GREETING, _SOCKS5_GREETING
            self.send_pending()
            return True
        if mask & selectors.EVENT_WRITE:
            self.send_pending()
            return False
        data = self.sock.recv(4096)
        if not data:
            raise _RampFailure(f"eof_in_{('greeting', 'request', 'echo')[self.state - _GREETING]}")
        self.inbuf += data
        if self.state == _GREETING and len(self.inbuf) >= 2:
            if self.inbuf[:2] != b"\x05\x00":
                raise _RampFailure("socks_greeting_rejected")
            self.state, self.inbuf, self.out = _REQUEST, self.inbuf[2:], self.request
        elif self.state == _REQUEST and len(self.inbuf) >= 5:
            # reply: VER REP RSV ATYP BND.ADDR BND.PORT; length depends on ATYP
            size = {1: 10, 4: 22, 3: 7 + self.inbuf[4]}.get(self.inbuf[3], 10)
            if len(self.inbuf) < size:
                return False
            if self.inbuf[1] != 0:
                raise _RampFailure(f"socks_reply_{self.inbuf[1]}")
            self.state, self.inbuf, self.out = _ECHO, self.inbuf[size:], self.payload
        elif self.state == _ECHO and len(self.inbuf) >= len(self.payload):
            if self.inbuf[:len(self.payload)] != self.payload:
                raise _RampFailure("echo_mismatch")
            self.state = _HELD
            return True
        else:
            return False
        self.send_pending()
        return True


class HeldConnections:
    """Connections a ramp kept open (``socks5_ramp(..., keep=True)``): every one has
    done its SOCKS5 handshake and echoed once.  ``times`` are the monotonic times of
    those first echoes.  ``check()`` sends each a new payload and waits for it to
    come back, so a connection that was cut in between is found; ``close()`` (or
    leaving the ``with`` block) closes them all.  Several ramps' connections can be
    gathered into one with ``extend()``."""

    def __init__(self, socks=(), times=()):
        self.socks, self.times = list(socks), list(times)

    def __len__(self):
        return len(self.socks)

    def extend(self, other):
        self.socks.extend(other.socks)
        self.times.extend(other.times)
        other.socks, other.times = [], []
        return self

    def check(self, timeout=30.0, stall_timeout=5.0):
        """Send every connection a unique payload and read it back.  Returns
        ``{"checked", "echoed", "failures": {reason: count}, "seconds"}``; bounded
        by ``timeout`` overall and ``stall_timeout`` without progress.  A failed
        connection is closed and dropped, so the next check sees only live ones."""
        sel = selectors.DefaultSelector()
        checked = len(self.socks)
        want, got, failures, alive = {}, {}, {}, []
        start = last = time.monotonic()

        def fail(sock, reason):
            failures[reason] = failures.get(reason, 0) + 1
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            sock.close()

        for index, sock in enumerate(self.socks):
            payload = b"ssrig again %08d\n" % index
            try:
                sent = sock.send(payload)  # a few bytes into an empty buffer: all of it or an error
            except OSError as exc:
                fail(sock, f"send_{errno.errorcode.get(exc.errno, type(exc).__name__)}")
                continue
            if sent != len(payload):
                fail(sock, "send_short")
                continue
            want[sock], got[sock] = payload, b""
            sel.register(sock, selectors.EVENT_READ)
        pending = set(want)
        try:
            while pending:
                now = time.monotonic()
                if now - start >= timeout or now - last >= stall_timeout:
                    break
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except OSError as exc:
                        pending.discard(sock)
                        fail(sock, f"error_{errno.errorcode.get(exc.errno, type(exc).__name__)}")
                        continue
                    last = time.monotonic()
                    if not data:
                        pending.discard(sock)
                        fail(sock, "eof")
                        continue
                    got[sock] += data
                    if len(got[sock]) >= len(want[sock]):
                        pending.discard(sock)
                        sel.unregister(sock)
                        if got[sock] == want[sock]:
                            alive.append(sock)
                        else:
                            fail(sock, "echo_mismatch")
            for sock in pending:
                fail(sock, "no_echo_in_time")
        finally:
            sel.close()
        kept = set(alive)
        self.times = [t for sock, t in zip(self.socks, self.times) if sock in kept]
        self.socks = [sock for sock in self.socks if sock in kept]
        return {"checked": checked, "echoed": len(alive), "failures": failures,
                "seconds": round(time.monotonic() - start, 3)}

    def close(self):
        for sock in self.socks:
            sock.close()
        self.socks, self.times = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def socks5_ramp(socks_port, target_port, count, ss=None, timeout=30.0, stall_timeout=3.0,
                batch=256, hold_seconds=0.3, target_host=HOST, keep=False):
    """Open ``count`` concurrent SOCKS5 CONNECTs via ``socks_port`` to ``target_host:target_port``.

    Every connection does the SOCKS5 handshake (no auth, CONNECT IPv4), sends a
    unique small payload and must get it echoed back; echoed connections stay
    open until the ramp ends, are measured, then all are closed.  The ramp ends
    when every connection is held or failed, at ``timeout`` seconds overall, or when
    nothing progressed for ``stall_timeout`` seconds (connections stuck behind an
    fd-starved ss-server never progress).  ``batch`` caps new sockets per loop turn.
    ``ss`` (an SsServerProgram) adds ss-server measurements.  Raises the caller's
    soft RLIMIT_NOFILE to hard (non-blocking sockets + selectors: thousands are fine).

    Returns a dict: requested, attempted, held, failed, seconds (start -> last echo),
    elapsed, timed_out, stalled, failures (reason -> count), and with ``ss``:
    ss_server_pid, ss_server_nofile (soft, hard), ss_server_open_fds, rss_kb
    (VmRSS while all were held), too_many_open_files (lines during the ramp),
    too_many_open_files_total.  first_echo: monotonic time of the first echo (None).

    ``keep=True``: the held connections are not closed at the end but returned
    as ``result["kept"]`` (a HeldConnections; the caller closes them).  Failed
    and unfinished ones are closed either way.
    """
    raise_nofile_soft_limit()
    request = b"\x05\x01\x00\x01" + socket.inet_aton(target_host) + target_port.to_bytes(2, "big")
    fd_before = ss.fd_error_count() if ss else 0
    sel = selectors.DefaultSelector()
    conns, failures = [], {}
    held = pending = 0
    start = last_progress = time.monotonic()
    last_echo = first_echo = None
    echo_times = {}  # conn -> time of its echo
    timed_out = stalled = False
    handed_over = set()  # connections given to the caller (keep=True): not closed here

    def fail(conn, reason, n=1):
        nonlocal pending
        failures[reason] = failures.get(reason, 0) + n
        if conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(conn.sock)
            conn.sock.close()
            conn.state = _FAILED
            pending -= 1

    try:
        while True:
            # 1. open up to `batch` new connections
            opened = 0
            while len(conns) < count and opened < batch:
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as exc:  # the client itself ran out of fds
                    fail(None, f"client_socket_{errno.errorcode.get(exc.errno, exc.errno)}", count - len(conns))
                    count_left = 0
                    break
                sock.setblocking(False)
                conn = _Conn(sock, request, b"ssrig %08d\n" % len(conns))
                conns.append(conn)
                opened += 1
                pending += 1
                sel.register(sock, selectors.EVENT_WRITE, conn)
                rc = sock.connect_ex((HOST, socks_port))
                if rc not in (0, errno.EINPROGRESS):
                    fail(conn, f"connect_{errno.errorcode.get(rc, rc)}")
            else:
                count_left = count - len(conns)
            # 2. stop conditions
            now = time.monotonic()
            if opened:
                last_progress = now
            if pending == 0 and count_left == 0:
                break
            if now - start >= timeout:
                timed_out = True
                break
            if now - last_progress >= stall_timeout:
                stalled = True
                break
            # 3. advance connections that are ready
            for key, mask in sel.select(timeout=0 if count_left else 0.1):
                conn = key.data
                try:
                    if not conn.step(mask):
                        continue
                except _RampFailure as exc:
                    fail(conn, exc.args[0])
                    continue
                except OSError as exc:
                    fail(conn, f"error_{errno.errorcode.get(exc.errno, type(exc).__name__)}")
                    continue
                last_progress = time.monotonic()
                if conn.state == _HELD:
                    sel.unregister(conn.sock)
                    held += 1
                    pending -= 1
                    last_echo = last_progress
                    first_echo = first_echo or last_echo
                    echo_times[conn] = last_echo
                else:
                    sel.modify(conn.sock, conn.events(), conn)
        elapsed = time.monotonic() - start
        stuck = sum(1 for c in conns if c.state not in (_HELD, _FAILED))
        if stuck:
            fail(None, "no_echo_in_time", stuck)
        if len(conns) < count and not any(k.startswith("client_socket") for k in failures):
            fail(None, "not_attempted", count - len(conns))
        result = {
            "requested": count,
            "attempted": len(conns),
            "held": held,
            "failed": count - held,
            "seconds": round((last_echo - start) if last_echo else 0.0, 3),
            "elapsed": round(elapsed, 3),
            "timed_out": timed_out,
            "stalled": stalled,
            "failures": failures,
            "first_echo": first_echo,
        }
        if ss is not None:
            time.sleep(hold_seconds)  # everything still held; lets the counter flush
            pid = ss.pid()
            result.update({
                "ss_server_pid": pid,
                "ss_server_nofile": read_nofile_limits(pid) if pid else None,
                "ss_server_open_fds": count_open_fds(pid) if pid else None,
                "rss_kb": read_rss_kb(pid) if pid else None,
                "too_many_open_files": ss.fd_error_count() - fd_before,
                "too_many_open_files_total": ss.fd_error_count(),
            })
        if keep:
            kept = [c for c in conns if c.state == _HELD]
            result["kept"] = HeldConnections([c.sock for c in kept], [echo_times[c] for c in kept])
            handed_over.update(kept)
        return result
    finally:
        for conn in conns:
            if conn.state != _FAILED and conn not in handed_over:
                conn.sock.close()
        sel.close()
