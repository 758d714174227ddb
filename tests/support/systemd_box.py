"""SystemdBox: a real systemd (the host's own Debian 12 systemd 252) booted as
PID 1 in a systemd-nspawn container, for tests that need real units: drop-ins,
`systemctl daemon-reload`, restarts, start limits, and the /proc/PID/limits of
the daemons systemd started.

This file owns the container's whole life: the launch (private mount
namespace, overlay root, own cgroups), running commands and files inside it,
the orderly shutdown, and `sweep_run()`, the session safety net that removes
whatever an interrupted run of THIS pytest process left behind.

How a box is built (mode "host", the only mode: the host's / is the lower
layer, so the host's packages, /work and its venvs are all visible inside):

    pytest ── Popen ── unshare -m --propagation private ── sh (launcher) ── exec systemd-nspawn
                         every mount below lives only in this namespace:
                           tmpfs over /run          nspawn's /run/systemd/nspawn stays off the host
                           bind (not rbind) of /    the lower: no /proc, /sys, /dev, other mounts
                           tmpfs STATE/rw           the overlay's upper and work dirs
                           overlay STATE/root       the container's root; writes vanish at down()
                         the launcher first moves itself into
                         /sys/fs/cgroup/{systemd,unified}/sstest-RUN-NAME, so nspawn's
                         "payload"/"supervisor" cgroups land there, not at the host's root

Why it is safe for the host (checked in `down()`):
  * nothing is mounted in the host's mount namespace; when nspawn exits, its
    namespace and every mount in it go away;
  * --private-network: the container's only interface is its own lo;
  * nspawn makes /proc/sys read-only inside except net.*, which belongs to the
    container's own network namespace: its systemd-sysctl cannot touch the host;
  * every unit the host enables (postgresql, ssh, timers...) is masked inside,
    except `keep_units`;
  * only PIDs this object started (nspawn is our child) or recorded and
    re-checked (the container's PID 1) are ever signalled.
"""

import contextlib
import ctypes
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
# PATH inside the container, and the only environment commands get there:
# the host's PIP_*/PYENV_*/VIRTUAL_ENV must not leak in.
CT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CT_ENV = ("PATH=" + CT_PATH, "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0")
# One id per pytest process: cgroups, machine names and state dirs of this run
# carry it, so the safety net never touches another run's containers.
RUN_ID = "%d%s" % (os.getpid(), secrets.token_hex(2))
PREFIX = "sstest-%s-" % RUN_ID
STATE_PARENT = "/tmp"

# Boxes of this process that are (or may be) up: sweep_run() downs them first.
_LIVE = {}

# The launcher, run by `unshare -m --propagation private sh -c`. Positional
# arguments: state dir, cgroup name, upper tmpfs size, units to keep enabled,
# then systemd-nspawn's extra arguments.
_LAUNCHER = r"""
set -eu
st=$1 cg=$2 rw_size=$3 keep=$4; shift 4
for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
    [ -d "$h/$cg" ] && echo $$ > "$h/$cg/cgroup.procs"
done
mount -t tmpfs -o mode=755,size=64m sstest-run /run
mount --bind / "$st/lower"
mount -t tmpfs -o mode=755,size="$rw_size" sstest-rw "$st/rw"
mkdir "$st/rw/upper" "$st/rw/work"
mount -t overlay sstest-root -o "lowerdir=$st/lower,upperdir=$st/rw/upper,workdir=$st/rw/work" "$st/root"
R=$st/root
# A machine id of its own: the host's would make nspawn refuse to link the
# journal. Not empty (that is a "first boot": presets, systemd-firstboot).
# rm first: a symlinked /etc/machine-id must not be written through.
rm -f "$R/etc/machine-id"
tr -d - < /proc/sys/kernel/random/uuid > "$R/etc/machine-id"
# Mask every unit the host enables, except the ones under test.
for f in "$R"/etc/systemd/system/*.wants/* "$R"/etc/systemd/system/*.requires/*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    u=${f##*/}
    case " $keep " in *" $u "*) continue ;; esac
    ln -sfn /dev/null "$R/etc/systemd/system/$u"
done
exec systemd-nspawn -D "$R" --machine="$cg" --boot --private-network \
    --register=no --keep-unit --console=read-only --tmpfs=/tmp "$@"
"""


class BoxError(RuntimeError):
    """A box failed to boot, a command inside failed, or teardown left something."""


def _die_with_parent():
    """preexec_fn: if pytest dies without down(), the kernel sends nspawn
    SIGTERM (PR_SET_PDEATHSIG survives the execs), which nspawn turns into an
    orderly shutdown of the container. (The signal follows the *thread* that
    started it: start boxes from pytest's main thread.)"""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def nspawn_available():
    return shutil.which("systemd-nspawn") is not None


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _status_field(pid, field):
    text = _read("/proc/%d/status" % pid) or ""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].split()
    return None


def is_container_init(pid, parent=None):
    """True when PID is alive, is PID 1 of its own PID namespace (last NSpid
    field is 1) and, if given, a child of `parent`."""
    nspid = _status_field(pid, "NSpid")
    if not nspid or len(nspid) < 2 or nspid[-1] != "1":
        return False
    return parent is None or (_status_field(pid, "PPid") or [None])[0] == str(parent)


def _is_nspawn(pid):
    try:
        return os.path.basename(os.readlink("/proc/%d/exe" % pid)) == "systemd-nspawn"
    except OSError:
        return False


def _children(pid):
    text = _read("/proc/%d/task/%d/children" % (pid, pid)) or ""
    return [int(p) for p in text.split()]


def _nofile(limits_text, where):
    for line in limits_text.splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise BoxError("no 'Max open files' line in %s" % where)


def _mounts_under(path):
    """Mount points in THIS process's mount namespace at or under `path`."""
    path = os.path.realpath(path).rstrip("/") + "/"
    found = []
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        point = line.split()[4]
        if (point + "/").startswith(path):
            found.append(point)
    return found


def _cgroup_pids(directory):
    pids = []
    for procs in glob.glob(os.path.join(directory, "**", "cgroup.procs"), recursive=True):
        pids.extend(int(p) for p in (_read(procs) or "").split())
    return pids


def _remove_cgroup(directory, timeout):
    """rmdir a cgroup tree deepest first. A cgroup stays busy until its last
    task has been reaped, so retry for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(directory):
        dirs = sorted((d for d, _, _ in os.walk(directory)), key=len, reverse=True)
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if not os.path.isdir(directory):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def visible_in_host_mode(path):
    """True when `path` is seen inside a box as it is on the host: it lies on
    the host's root mount (the lower layer is a non-recursive bind of /) and
    not under /tmp (a fresh tmpfs inside). Anything else needs a bind."""
    path = os.path.realpath(path)
    if path == "/tmp" or path.startswith("/tmp/"):
        return False
    best = "/"
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        point = line.split()[4]
        if (path + "/").startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best = point
    return best == "/"


class SystemdBox:
    """One container with a real systemd as PID 1.

    SystemdBox(name, keep_units=(...), binds_ro=(...), binds_rw=(...)):
      name        short name, part of the cgroup and machine name (sstest-RUN-NAME)
      keep_units  units the host enables that stay enabled inside (others are masked)
      binds_ro/rw host paths bound at the same path inside (e.g. tmp_path dirs:
                  the container's /tmp is its own tmpfs)

    Use as a context manager, or up() / down(). Commands run in all of the
    container's namespaces through nsenter with a clean environment.
    """

    def __init__(self, name, keep_units=(), binds_ro=(), binds_rw=(), boot_timeout=60,
                 down_timeout=30, upper_size="2g"):
        self.name = name
        self.cgroup = PREFIX + name
        self.keep_units = tuple(keep_units)
        self.binds_ro = tuple(str(p) for p in binds_ro)
        self.binds_rw = tuple(str(p) for p in binds_rw)
        self.boot_timeout = boot_timeout
        self.down_timeout = down_timeout
        self.upper_size = upper_size
        self.state = None       # host dir holding lower/, rw/, root/ mount points and the console log
        self.proc = None        # Popen of the launcher = systemd-nspawn (same PID after the execs)
        self.pid1 = None        # host PID of the container's systemd
        self.boot_seconds = None
        self.shutdown_seconds = None
        self.boot_state = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    def up(self):
        """Boot and wait (bounded) until `systemctl is-system-running` says
        running or degraded. On failure: tear down, raise with the console tail."""
        if self.proc is not None:
            raise BoxError("box %s is already up" % self.name)
        if not nspawn_available():
            raise BoxError("systemd-nspawn not found: apt-get install --no-install-recommends systemd-container")
        for path in self.binds_ro + self.binds_rw:
            if not os.path.exists(path):
                raise BoxError("bind source %s does not exist (box %s)" % (path, self.name))
        self.state = tempfile.mkdtemp(prefix=self.cgroup + "-", dir=STATE_PARENT)
        for sub in ("lower", "rw", "root"):
            os.mkdir(os.path.join(self.state, sub))
        for root in CGROUP_ROOTS:
            if os.path.isdir(root):
                os.makedirs(os.path.join(root, self.cgroup), exist_ok=True)
        extra = ["--bind-ro=" + p for p in self.binds_ro] + ["--bind=" + p for p in self.binds_rw]
        env = {"PATH": CT_PATH, "LANG": "C.UTF-8",
               # cgroup v2 only inside, as on a stock Debian 12 host (nspawn
               # would otherwise copy this host's v1 "hybrid" layout)
               "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        t0 = time.monotonic()
        _LIVE[id(self)] = self
        with open(self.console_path, "wb") as console:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", _LAUNCHER, "sstest-launcher",
                 self.state, self.cgroup, self.upper_size, " ".join(self.keep_units), *extra],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent)
        deadline = t0 + self.boot_timeout
        try:
            while self.pid1 is None:
                if self.proc.poll() is not None:
                    raise BoxError("systemd-nspawn exited %s before PID 1 appeared" % self.proc.returncode)
                if time.monotonic() > deadline:
                    raise BoxError("no container PID 1 after %ss" % self.boot_timeout)
                for child in _children(self.proc.pid):
                    if is_container_init(child, self.proc.pid):
                        self.pid1 = child
                time.sleep(0.05)
            state = ""
            while state not in ("running", "degraded"):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BoxError("boot not finished after %ss (state %r)" % (self.boot_timeout, state))
                state = self.run(["systemctl", "is-system-running", "--wait"],
                                 timeout=min(left, 10)).stdout.strip()
                if state not in ("running", "degraded"):
                    time.sleep(0.2)
            self.boot_state = state
        except (BoxError, subprocess.TimeoutExpired) as exc:
            tail = self.console_tail()
            with contextlib.suppress(BoxError):
                self.down()
            raise BoxError("box %s: %s\n--- console (last lines) ---\n%s" % (self.name, exc, tail)) from None
        self.boot_seconds = time.monotonic() - t0
        return self

    def down(self):
        """Power off (bounded wait), SIGKILL fallback only for the PIDs this box
        started or recorded and re-checked, remove its cgroups deepest first,
        then check that no mount is left in the host's namespace. Idempotent.
        Raises BoxError naming what was left behind."""
        if self.state is None:
            return
        t0 = time.monotonic()
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            asked = False
            if self._pid1_ok():
                with contextlib.suppress(BoxError, subprocess.TimeoutExpired, OSError):
                    asked = self.run(["systemctl", "poweroff", "--no-block"], timeout=10).returncode == 0
                if not asked and self._pid1_ok():
                    os.kill(self.pid1, signal.SIGRTMIN + 4)  # systemd's "poweroff" signal
            try:
                self.proc.wait(timeout=self.down_timeout)
            except subprocess.TimeoutExpired:
                problems.append("poweroff did not finish in %ss: SIGTERM to nspawn" % self.down_timeout)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    # SIGKILL to a PID namespace's PID 1 ends every process in it.
                    if self._pid1_ok():
                        os.kill(self.pid1, signal.SIGKILL)
                    self.proc.kill()  # our own child: its PID cannot have been reused
                    self.proc.wait(timeout=10)
        for root in CGROUP_ROOTS:
            directory = os.path.join(root, self.cgroup)
            if not _remove_cgroup(directory, timeout=10):
                problems.append("cgroup %s still there (pids %s)" % (directory, _cgroup_pids(directory)))
        left = _mounts_under(self.state)
        if left:
            problems.append("mounts left in the host namespace: %s" % left)
        self.shutdown_seconds = time.monotonic() - t0
        self._console_kept = self.console_tail(80)
        if not left:
            shutil.rmtree(self.state, ignore_errors=True)
        self.state = None
        self.proc = None
        self.pid1 = None
        _LIVE.pop(id(self), None)
        if problems:
            raise BoxError("box %s teardown: %s" % (self.name, "; ".join(problems)))

    def _pid1_ok(self):
        return (self.pid1 is not None and self.proc is not None
                and is_container_init(self.pid1, self.proc.pid))

    @property
    def console_path(self):
        return os.path.join(self.state, "console.log")

    def console_tail(self, lines=20):
        if self.state is None:
            return getattr(self, "_console_kept", "")
        text = _read(self.console_path) or ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------ inside
    def run(self, argv, check=False, timeout=60, input=None):
        """Run argv inside (all namespaces of the container's PID 1, clean
        environment). Returns a CompletedProcess (text). On timeout the whole
        process group this call started is killed, then TimeoutExpired raised."""
        if self.pid1 is None:
            raise BoxError("box %s is not up" % self.name)
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *CT_ENV, *[str(a) for a in argv]]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call made (start_new_session)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise BoxError("in box %s: %s exited %d\nstdout: %s\nstderr: %s"
                           % (self.name, " ".join(map(str, argv)), result.returncode,
                              out[-2000:], err[-2000:]))
        return result

    def write(self, path, text, mode=0o644):
        """Write a file inside (parents made; written to a temporary, then renamed)."""
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1.sstest-new" && chmod "$2" "$1.sstest-new"'
                  ' && mv -f "$1.sstest-new" "$1"', "sh", path, "%o" % mode], input=text, check=True)

    def read(self, path):
        return self.run(["cat", path], check=True).stdout

    def remove(self, path):
        self.run(["rm", "-f", path], check=True)

    def systemctl(self, *args, check=True, timeout=60):
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit, *props):
        """{property: value} from `systemctl show` (the configured values, not
        necessarily the effective ones: see limits())."""
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit):
        """The unit's MainPID as seen inside the container (0: not running)."""
        return int(self.show(unit, "MainPID")["MainPID"])

    def limits(self, pid):
        """(soft, hard) open-files limit of a container PID, read inside from /proc."""
        return _nofile(self.read("/proc/%d/limits" % pid), "/proc/%d/limits in box %s" % (pid, self.name))

    @property
    def ceiling(self):
        """The hard open-files limit of the container's PID 1: no unit can get
        more (systemd lacks CAP_SYS_RESOURCE to raise it), so a larger
        LimitNOFILE= is clamped to this."""
        return _nofile(_read("/proc/%d/limits" % self.pid1) or "", "/proc/%d/limits (host)" % self.pid1)[1]

    def reset_failed(self, unit):
        self.systemctl("reset-failed", unit, check=False)

    def daemon_reload(self):
        self.systemctl("daemon-reload")

    def restart(self, unit, timeout=60):
        self.systemctl("restart", unit, timeout=timeout)

    def wait_active(self, unit, timeout=30):
        """Wait (bounded) until the unit is active; raise with its status and
        journal on failed or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.systemctl("is-active", unit, check=False).stdout.strip()
            if state == "active":
                return
            if state == "failed" or time.monotonic() > deadline:
                raise BoxError("unit %s is %r in box %s (waited up to %ss)\n%s" % (
                    unit, state, self.name, timeout, self.unit_report(unit)))
            time.sleep(0.1)

    def unit_report(self, unit):
        status = self.systemctl("status", "--no-pager", "-l", unit, check=False).stdout
        journal = self.run(["journalctl", "--no-pager", "-n", "30", "-u", unit]).stdout
        return status + "\n--- journal ---\n" + journal

    def listening(self, port, proto="tcp"):
        """True when something listens on the port inside the container
        (TCP LISTEN, or a bound UDP socket), read from /proc/net."""
        want = ":%04X" % port
        for name in (proto, proto + "6"):
            for line in self.read("/proc/net/" + name).splitlines()[1:]:
                fields = line.split()
                local, st = fields[1], fields[3]
                if local.endswith(want) and (proto == "udp" or st == "0A"):
                    return True
        return False

    def wait_listening(self, port, timeout=30, unit=None):
        deadline = time.monotonic() + timeout
        while not self.listening(port):
            if time.monotonic() > deadline:
                raise BoxError("nothing listens on port %d in box %s after %ss\n%s" % (
                    port, self.name, timeout, self.unit_report(unit) if unit else ""))
            time.sleep(0.1)

    # ------------------------------------------------------------ measuring
    def memory_kb(self):
        """{'pss': kB of every process in the box's cgroups, 'upper': kB the
        overlay's tmpfs upper holds}: what one box costs the host."""
        pids = set()
        for root in CGROUP_ROOTS:
            pids.update(_cgroup_pids(os.path.join(root, self.cgroup)))
        pss = 0
        for pid in pids:
            for line in (_read("/proc/%d/smaps_rollup" % pid) or "").splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        # the upper tmpfs is mounted only in nspawn's namespace: look through it
        upper = os.statvfs("/proc/%d/root%s/rw" % (self.proc.pid, self.state))
        used = (upper.f_blocks - upper.f_bfree) * upper.f_frsize // 1024
        return {"pss": pss, "upper": used, "processes": len(pids)}


def sweep_run():
    """Session safety net: remove what boxes of THIS run (this pytest process)
    left behind, as teardown.sh does for the shell recipe. Boxes still known
    are downed in order; then, in leftover sstest-<this run>-* cgroups, only a
    container PID 1 (SIGKILL: it takes its PID namespace with it) or a
    systemd-nspawn (SIGTERM) is signalled; then the cgroups and state dirs go.
    Returns a list of what it had to do (empty: nothing was left)."""
    done = []
    for box in list(_LIVE.values()):
        done.append("box %s was still up: downed" % box.name)
        try:
            box.down()
        except BoxError as exc:
            done.append(str(exc))
    signalled = set()
    for root in CGROUP_ROOTS:
        for directory in glob.glob(os.path.join(root, PREFIX + "*")):
            for pid in set(_cgroup_pids(directory)) - signalled:
                signalled.add(pid)
                if is_container_init(pid):
                    done.append("SIGKILL leftover container PID 1 %d (%s)" % (pid, directory))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                elif _is_nspawn(pid):
                    done.append("SIGTERM leftover systemd-nspawn %d (%s)" % (pid, directory))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
    for root in CGROUP_ROOTS:
        for directory in glob.glob(os.path.join(root, PREFIX + "*")):
            ok = _remove_cgroup(directory, timeout=15)
            done.append("removed cgroup %s" % directory if ok else "could NOT remove cgroup %s" % directory)
    for state in glob.glob(os.path.join(STATE_PARENT, PREFIX + "*")):
        if _mounts_under(state):
            done.append("not removing %s: mounts under it" % state)
        else:
            shutil.rmtree(state, ignore_errors=True)
            done.append("removed state dir %s" % state)
    return done
