"""Real-parts harness: a shadowsocks data path on loopback.

This module is the facade: every name of the harness is importable from here
(``from support import ssrig``, or ``import ssrig`` with tests/support on sys.path),
and run as a script it is the entry point of the helper processes.  The parts
live next to it:

* ``ssrig_processes``  - constants (``HOST``, ...), errors, helpers for binaries,
                         ports, limits and /proc, ``EchoServer``, the counting
                         wrapper and ``CountedProcess``.
* ``ssrig_supervisor`` - ``SsServerProgram``, ``PrivateSupervisor``, ``FileGuard``,
                         ``SystemSupervisor``, and what was observed of Debian's
                         supervisor init script, supervisord and ss-server.
* ``ssrig_load``       - ``SsLocal``, ``socks5_ramp()`` and ``HeldConnections``.
* here                 - ``Rig``, ``loopback_rig()`` and the script entry ``_main``.

Pieces (all on 127.0.0.1, all stopped and cleaned up by their context managers):

* ``EchoServer``        - selectors echo server in a child process (thousands of
                          connections; raises its own soft RLIMIT_NOFILE to hard).
* ``CountedProcess``    - runs a daemon behind a small wrapper that reads the
                          daemon's stdout+stderr through a pipe and only *counts*
                          lines (and ``too many open files`` lines) into a small
                          JSON status file.  ss-server at a low fd limit retries
                          accept() in a tight loop and would otherwise write
                          gigabytes of log.
* ``SsServerProgram``   - ss-server wrapped as above, as a supervisord program.
* ``PrivateSupervisor`` - a private supervisord (temp config, socket, pidfile,
                          logs) started under a chosen ``ulimit -n`` and ``minfds``.
* ``SystemSupervisor``  - Debian's real ``/etc/init.d/supervisor`` with a temporary
                          program file in ``/etc/supervisor/conf.d``; restores every
                          file it touches byte for byte and leaves supervisord
                          running/stopped as it found it.
* ``SsLocal``           - ss-local (SOCKS5) pointing at the ss-server.
* ``socks5_ramp()``     - K concurrent SOCKS5 CONNECTs through ss-local to the
                          echo server, all held open at once, each checked by echo;
                          ``keep=True`` leaves them open as ``HeldConnections``,
                          whose ``check()`` echoes through each again later.
* ``loopback_rig()``    - everything above in one ``with`` block.

Run as a script, this module also provides the two helper processes it starts:
``python ssrig.py echo-server ...`` and ``python ssrig.py count-wrap ...``.
"""

import contextlib
import sys

# Run as a helper process: import the parts without writing __pycache__ into
# tests/support (running the single file as a script wrote none).
if __name__ == "__main__":
    sys.dont_write_bytecode = True

# Every name of the parts, private helpers included (each part's __all__ lists them).
if __package__:  # support.ssrig (pytest: tests/ on sys.path)
    from .ssrig_processes import *  # noqa: F401,F403
    from .ssrig_supervisor import *  # noqa: F401,F403
    from .ssrig_load import *  # noqa: F401,F403
else:  # tests/support itself on sys.path: bench/capacity, ssrig_demo.py, `python ssrig.py ...`
    from ssrig_processes import *  # noqa: F401,F403
    from ssrig_supervisor import *  # noqa: F401,F403
    from ssrig_load import *  # noqa: F401,F403


# --------------------------------------------------------------------------
# everything together
# --------------------------------------------------------------------------

class Rig:
    """Handle yielded by loopback_rig(): ``echo``, ``server`` (PrivateSupervisor or
    SystemSupervisor; ``server.ss`` is the SsServerProgram), ``local`` (SsLocal)."""

    def __init__(self, echo, server, local):
        self.echo, self.server, self.local = echo, server, local

    @property
    def ss(self):
        return self.server.ss

    def ramp(self, count, **kwargs):
        """socks5_ramp() through this rig's ss-local to its echo server."""
        return socks5_ramp(self.local.port, self.echo.port, count, ss=self.server.ss, **kwargs)


@contextlib.contextmanager
def loopback_rig(nofile=None, minfds=None, system=False, defaults_lines=(),
                 password=DEFAULT_PASSWORD, method=DEFAULT_METHOD, max_seconds=600):
    """Echo server + supervised ss-server + ss-local, all torn down on exit.

    ``system=False``: PrivateSupervisor(nofile, minfds).  ``system=True``:
    SystemSupervisor(defaults_lines) through /etc/init.d/supervisor (``nofile`` and
    ``minfds`` are then ignored; put e.g. 'ulimit -n 16384' in defaults_lines).
    """
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(EchoServer())
        if system:
            server = stack.enter_context(SystemSupervisor(
                password=password, method=method, defaults_lines=defaults_lines,
                max_seconds=max_seconds))
        else:
            server = stack.enter_context(PrivateSupervisor(
                nofile=nofile, minfds=minfds, password=password, method=method,
                max_seconds=max_seconds))
        local = stack.enter_context(SsLocal(server.port, password=password, method=method))
        yield Rig(echo, server, local)


def _main(argv):
    import argparse
    parser = argparse.ArgumentParser(description="ssrig helper processes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_echo = sub.add_parser("echo-server")
    p_echo.add_argument("--host", default=HOST)
    p_echo.add_argument("--port", type=int, default=0)
    p_wrap = sub.add_parser("count-wrap")
    p_wrap.add_argument("--status", required=True)
    p_wrap.add_argument("--max-seconds", type=float, default=600)
    p_wrap.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "echo-server":
        return _run_echo_server(args.host, args.port) or 0
    child = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return _run_count_wrapper(args.status, args.max_seconds, child)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
