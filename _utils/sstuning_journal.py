"""
Everything this package writes goes through here: read a file as text,
describe a change as a diff, replace a file atomically, keep the originals
that ``clean`` puts back (``<state_dir>/originals.json``), and the lock that
keeps two applies on one box from interleaving. No Salt here: every function
takes the paths it works on.
"""

import base64
import collections
import contextlib
import difflib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_procfs as procfs
from sstuning_catalogue import validate_key

_TEMP_MARK = ".sst-"
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class NotRegularFile(CommandExecutionError):
    """A path that is not a plain file of its own where one is needed."""


def read_text(path, max_bytes=None):
    """The text of a regular file (bytes that are not UTF-8 kept as
    surrogates, to be written back as they were), or None when it does not
    exist. Anything else (a directory, a named pipe, a device) raises
    NotRegularFile instead of being read: a pipe would block forever. A file
    over ``max_bytes`` raises OSError (EFBIG) unread."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise NotRegularFile(f"{path} is a directory, not a file")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{path} is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{path} is over {max_bytes} bytes")
        # Sized by the file: a fixed large buffer is allocated (and mapped) per read.
        size = info.st_size + 1
        chunks = []
        while True:
            chunk = os.read(fd, size)
            chunks.append(chunk)
            if len(chunk) < size:  # a short read of a regular file: its end
                break
            size = 1 << 16
        return b"".join(chunks).decode("utf-8", errors="surrogateescape")
    finally:
        os.close(fd)


# The largest file this package edits or records: a hand-written config is a
# few KiB; a bigger one is refused before it is read, so that memory and the
# record of originals stay small on a small VPS.
MAX_MANAGED = 4 << 20


def read_managed(path):
    """The text of a file this package rewrites, or None when it does not
    exist. One rule for links: a symbolic link or a file with more than one
    hard link is refused, never followed or read, so nothing outside the
    managed path is read into output or copied into a file this package
    writes. A file over ``MAX_MANAGED`` is refused too. Raises
    NotRegularFile with what to do."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise NotRegularFile(
            f"{path} is a symbolic link (to {os.readlink(path)}); refusing to follow it: point the setting at "
            "the real file, or replace the link with a regular file"
        )
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise NotRegularFile(
            f"{path} has {info.st_nlink} hard links; refusing to rewrite it (its other names would keep the old "
            "content, or a copy would expose it): make it a file of its own"
        )
    if stat.S_ISREG(info.st_mode) and info.st_size > MAX_MANAGED:
        raise NotRegularFile(
            f"{path} is {info.st_size / (1 << 20):.1f} MiB, over the {MAX_MANAGED >> 20} MiB this package edits "
            "(a hand-written config is a few KiB): see what filled it, or point the setting at another file"
        )
    return read_text(path)


_WHY = {errno.ENOSPC: "no space left on that file system: free some and run again",
        errno.EDQUOT: "the disk quota is used up: free some and run again",
        errno.EROFS: "the file system is read-only: remount it read-write, or point the setting elsewhere",
        errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (immutable or protected?)"}


def describe_error(path, exc):
    """``PATH: what went wrong and what to do``, for an OSError on ``path``."""
    if isinstance(exc, CommandExecutionError):
        return str(exc)
    return f"{path}: {_WHY.get(getattr(exc, 'errno', None), exc.strerror or str(exc))}"


def package_conffile(path, info_dir="/var/lib/dpkg/info"):
    """The Debian package that owns ``path`` as a conffile, or None. Only a
    file that exists and that this package has not written yet (no managed
    header) is looked up: the lists are read once, on the first run."""
    try:
        text = read_text(path, MAX_MANAGED)
    except (OSError, NotRegularFile):
        return None  # read_managed reports it
    if text is None or "shadowsocks_tuning" in text:
        return None
    # A whole line: /etc/default/x must not match /usr/local/etc/default/x.
    needle = b"\n" + path.encode() + b"\n"
    with contextlib.suppress(OSError):
        for name in os.listdir(info_dir):
            if name.endswith(".conffiles"):
                with contextlib.suppress(OSError):
                    with open(os.path.join(info_dir, name), "rb") as handle:
                        if needle in b"\n" + handle.read(1 << 20) + b"\n":
                            return name[: -len(".conffiles")].split(":", 1)[0]
    return None


def stamp(path):
    """What says a file changed: (inode, size, mtime), None when missing."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def file_change(path, new_text, old_text=None):
    """``{"old", "new", "diff"}`` between the file's text and ``new_text``, or
    None when they are the same."""
    if old_text is None:
        old_text = read_text(path)
    if old_text == new_text:
        return None
    diff = "".join(
        difflib.unified_diff(
            (old_text or "").splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=path if old_text is not None else "/dev/null", tofile=path,
        )
    )
    # Bytes that are not UTF-8 break Salt's msgpack and JSON output: show them as \xe9.
    diff = diff.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return {"old": old_text, "new": new_text, "diff": diff}


def atomic_write(path, text, mode=None, durable=True):
    """Temporary file in the same directory, rename: the old file or the new
    one, never half of either. ``durable`` fsyncs the data before the rename,
    so the new content survives a power cut right after; without it a power
    cut before the next journal commit may bring back the old content (or an
    empty file where there was none), which is fine for a file the next run
    rewrites anyway. The directory is never fsynced: that would only make the
    new name durable earlier. ``mode`` None keeps the mode and owner of the
    file replaced (0644 for a new one), so that an init script stays
    executable."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous = os.stat(path)
    keep_owner = mode is None  # an explicit mode means a root-owned file with that mode
    if mode is None:
        mode = previous.st_mode & 0o7777 if previous else 0o644
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}{_TEMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if keep_owner and previous is not None and (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(tmp, previous.st_uid, previous.st_gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_stray_temporaries(path):
    """Temporary files left by a run that died between write and rename."""
    directory = os.path.dirname(path) or "."
    prefix = f".{os.path.basename(path)}{_TEMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


# --------------------------------------------------------------------------
# Originals, so that `clean` can put back what it found
# --------------------------------------------------------------------------
def generation_path(state_dir):
    return os.path.join(state_dir, "generation")


def generation(state_dir):
    """How many writes this box's runs have made under the lock (0: none yet)."""
    text = read_text(generation_path(state_dir)) or "0"
    return int(text) if text.strip().isdigit() else 0


def bump(state_dir):
    """After a write under the lock: a run that planned before it took the
    lock sees its plan is stale, also when only live values changed (no
    stamp of a file says that)."""
    atomic_write(generation_path(state_dir), f"{generation(state_dir) + 1}\n", mode=0o600, durable=False)


def originals_path(state_dir):
    return os.path.join(state_dir, "originals.json")


_SECTIONS = ("sysctls", "files", "written")


def load_originals(state_dir):
    """``{"sysctls": {key: value}, "files": {path: base64 or None},
    "written": {path: base64}}``: the first value of each key and the first
    content of each file (None: it did not exist), and what this package
    last wrote into each file. The document is checked whole: a record of
    the wrong shape is refused with one message, never half used."""
    path = originals_path(state_dir)
    how = (f"it is this package's own record: put back the copy you edited, or move it away "
           f"(mv {path} {path}.bad) and run again; clean then has nothing to put back")
    try:
        text = read_managed(path)
    except NotRegularFile as exc:
        raise CommandExecutionError(f"{exc}; {how}")
    except OSError as exc:
        raise CommandExecutionError(_unreadable_record(path, exc))
    if not text:
        return {name: {} for name in _SECTIONS}
    try:
        data = json.loads(text)
    except ValueError as exc:
        problems = [f"not JSON ({exc})"]
    else:
        problems = record_problems(data)
    if problems:
        raise CommandExecutionError(f"{path} is not a valid record of originals: {'; '.join(problems[:4])}; {how}")
    return {name: data.get(name, {}) for name in _SECTIONS}


_CONTROL = re.compile(r"[\x00-\x1f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f]")


def valid_record_path(path):
    """Absolute, normalised (no ``..``, ``.`` or ``//``), no control characters."""
    return (isinstance(path, str) and os.path.isabs(path) and os.path.normpath(path) == path
            and not _CONTROL.search(path))


def _base64_problem(raw):
    try:
        base64.b64decode(raw, validate=True)
    except (TypeError, ValueError):
        return "is not base64"
    return None


def record_problems(data):
    """What is wrong with a parsed originals document, as short phrases."""
    if not isinstance(data, dict):
        return [f"the document is {type(data).__name__ if data is not None else 'null'}, not a mapping"]
    problems = [f"unknown entry {name!r}" for name in data if name not in _SECTIONS]
    for name in _SECTIONS:
        if name in data and not isinstance(data[name], dict):
            problems.append(f"{name!r} is {type(data[name]).__name__}, not a mapping")
    if problems:
        return problems
    for key, value in data.get("sysctls", {}).items():
        try:
            validate_key(key)
        except SaltInvocationError:
            problems.append(f"sysctls: {key!r} is not a sysctl name")
            continue
        if not isinstance(value, str) or _CONTROL_BUT_TAB.search(value):
            problems.append(f"sysctls: {key}: {value!r} is not a sysctl value")
    for name in ("files", "written"):
        for path, raw in data.get(name, {}).items():
            if not valid_record_path(path):
                problems.append(f"{name}: {path!r} is not an absolute, normalised path")
            elif name == "written" and path not in data.get("files", {}):
                problems.append(f"written: {path} has no original")
            elif raw is not None or name == "written":
                problem = _base64_problem(raw) if isinstance(raw, str) else "is not a text"
                if problem:
                    problems.append(f"{name}: {path}: the saved content {problem}")
    return problems


def _raw_bytes(path):
    """A file's bytes for the record, None when it does not exist. Never
    through a link: callers have read it with ``read_managed`` already."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def remember(state_dir, originals, sysctls=None, files=None, written=None):
    """Record the first value of each key and the first content of each file
    (None: it did not exist); later changes never overwrite a record. Also
    record ``written`` ({path: text this package is about to write}), so
    that ``clean`` can tell the lines it wrote from lines added since."""
    changed = False
    for key, value in (sysctls or {}).items():
        if key not in originals["sysctls"]:
            originals["sysctls"][key] = value
            changed = True
    for path in files or ():
        if path not in originals["files"]:
            raw = _raw_bytes(path)
            originals["files"][path] = None if raw is None else base64.b64encode(raw).decode()
            changed = True
    for path, text in (written or {}).items():
        encoded = base64.b64encode(text.encode("utf-8", "surrogateescape")).decode()
        if originals["written"].get(path) != encoded:
            originals["written"][path] = encoded
            changed = True
    if changed:
        path = originals_path(state_dir)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            atomic_write(path, json.dumps(originals, indent=1, sort_keys=True), mode=0o600)
        except OSError as exc:
            # The record comes first: without it `clean` could not put back
            # what would be written next, so nothing is written.
            raise CommandExecutionError(f"cannot record the originals for clean: {describe_error(path, exc)}; "
                                        "nothing was changed")


def _unreadable_record(path, exc):
    # Not a bare OSError out of a plan: the state dir is a file, or unreadable.
    return (f"cannot read {describe_error(path, exc)}: minion option shadowsocks_tuning.state_dir must name a "
            "directory salt can read and write")


def original_text(raw):
    return base64.b64decode(raw).decode("utf-8", errors="surrogateescape")


def forget_originals(state_dir):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(originals_path(state_dir))


# --------------------------------------------------------------------------
# Restarts in progress: on record before the stop, so that a run killed
# between stop and start leaves a trace the next run finishes
# --------------------------------------------------------------------------
def restarts_path(state_dir):
    return os.path.join(state_dir, "restarts.json")


def pending_restarts(state_dir):
    """``[{"name", "init_system", "pidfile", "since"}]``: restarts an earlier
    run began (stopped the service) and did not finish."""
    path = restarts_path(state_dir)
    try:
        text = read_managed(path)
    except NotRegularFile as exc:
        raise CommandExecutionError(f"{exc}; it is this package's record of restarts in progress: move it away "
                                    f"(mv {path} {path}.bad) once you have checked those services run")
    except OSError as exc:
        raise CommandExecutionError(_unreadable_record(path, exc))
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) and item.get("init_system") in
            ("sysvinit", "systemd") for item in data):
        raise CommandExecutionError(
            f"{path} is not a valid record of restarts in progress; check that the services it names run, then "
            f"move it away (mv {path} {path}.bad)")
    return data


def _write_restarts(state_dir, items):
    path = restarts_path(state_dir)
    try:
        if items:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            atomic_write(path, json.dumps(items, indent=1), mode=0o600)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    except OSError as exc:
        raise CommandExecutionError(f"cannot record the restart in progress: {describe_error(path, exc)}")


def begin_restart(state_dir, name, init_system, pidfile, since):
    """On record before the service is stopped. Raises (and nothing is
    stopped) when the record cannot be written."""
    items = [item for item in pending_restarts(state_dir) if item["name"] != name]
    items.append({"name": name, "init_system": init_system, "pidfile": pidfile, "since": since})
    _write_restarts(state_dir, items)


def end_restart(state_dir, name):
    """Off the record once the service runs again."""
    items = pending_restarts(state_dir)
    if any(item["name"] == name for item in items):
        _write_restarts(state_dir, [item for item in items if item["name"] != name])


@contextlib.contextmanager
def lock(state_dir):
    """One apply at a time per box: concurrent runs queue, never interleave.
    Under umask 022 whatever the caller's: os.makedirs gives the parents it
    creates 0777 & ~umask, world-writable under umask 000."""
    umask = os.umask(0o022)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # O_NOFOLLOW: a planted link must not make this create a file elsewhere.
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        os.umask(umask)
        raise CommandExecutionError(
            f"cannot take the lock in {state_dir}: {exc.strerror or exc}; nothing was changed "
            "(shadowsocks_tuning.state_dir must be a writable directory)"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
        os.umask(umask)


def _lines(text):
    return (text or "").splitlines(keepends=True)


def put_back(original, written, current):
    """What ``clean`` makes of one file: ``(text or None to remove it,
    lines kept, lines lost)``. ``original``: the text before the first change
    (None: it did not exist); ``written``: what this package last wrote (None:
    not recorded); ``current``: the text now. Lines added since this package
    wrote the file are kept in a file it created; in a file that existed they
    would be lost by putting the original back, so they are returned as lost."""
    if current is None or current == original or written is None or current == written:
        return original, [], []
    ours = collections.Counter(_lines(written))
    added = []
    for line in _lines(current):
        if ours[line]:
            ours[line] -= 1
        else:
            added.append(line)
    if original is None:
        kept = [line for line in added if line.strip()]
        return ("".join(added) if kept else None), kept, []
    before = set(_lines(original))
    return original, [], [line for line in added if line not in before and line.strip()]


def _quoted(lines_):
    return ", ".join(repr(line.rstrip("\n")) for line in lines_[:5]) + (" ..." if len(lines_) > 5 else "")


def restore(state_dir, proc_root, managed, test, force=False):
    """Put back what the originals record: live sysctls first, then every
    file byte for byte (removing those this package created; keeping lines
    added to them since). Every entry is checked before anything is written:
    a path the current settings do not manage (``managed``), a file that is
    now a link or not a regular file, or lines added since to a file that
    existed (unless ``force``) stop the whole clean. Returns ``{key or path:
    change}``; under ``test`` only reports. Call under the lock."""
    try:
        originals = load_originals(state_dir)
    except CommandExecutionError as exc:
        raise CommandExecutionError(f"clean: {exc}\nNothing was changed")
    record = originals_path(state_dir)
    changes, problems, writes = {}, [], []
    for key, value in originals["sysctls"].items():
        current = procfs.read_or(proc_root, key)
        if current is not None and current != value:
            changes[key] = {"old": current, "new": value}
            writes.append((key, value))
    files = []
    for path, raw in sorted(originals["files"].items()):
        try:
            current = read_managed(path)  # a link planted since is refused, not followed
        except OSError as exc:
            problems.append(str(exc) if isinstance(exc, NotRegularFile) else f"{path}: cannot read: {exc.strerror}")
            continue
        written = originals["written"].get(path)
        written = None if written is None else original_text(written)
        # A file the settings no longer name (the pillar moved `config`) is still
        # this package's while it holds exactly what the package wrote there.
        if path not in managed and (written is None or current != written):
            problems.append(
                f"{record} lists {path}, which the current settings do not manage and which does not hold what "
                "this package wrote there: put back the pillar that managed it, or remove that entry from the record"
            )
            continue
        original = None if raw is None else original_text(raw)
        text, kept, lost = put_back(original, written, current)
        if lost and not force:
            problems.append(
                f"{path} changed since this package wrote it: putting back the original would lose "
                f"{len(lost)} line(s) added since: {_quoted(lost)}; copy them elsewhere first, or run clean "
                "with force=True to put back the original anyway"
            )
            continue
        if text == current:
            continue
        if text is None:
            changes[path] = {"old": "managed", "new": "removed (it did not exist before)"}
        else:
            changes[path] = {"diff": file_change(path, text, current)["diff"]}
            if kept:
                changes[path]["kept"] = f"{len(kept)} line(s) added since this package wrote it: {_quoted(kept)}"
            if lost:
                changes[path]["lost"] = f"{len(lost)} line(s) added since (force): {_quoted(lost)}"
        files.append((path, text))
    if problems:
        raise CommandExecutionError("clean: " + "\n".join(problems) + "\nNothing was changed")
    if test:
        return changes
    failed = []
    for key, value in writes:
        try:
            procfs.write(proc_root, key, value)
        except OSError as exc:
            failed.append(f"{key}: {exc.strerror or exc}")
    for path, text in files:
        try:
            if text is None:
                os.unlink(path)
                if path.endswith(".conf") and os.path.dirname(path).endswith(".service.d"):
                    # A drop-in directory (UNIT.service.d) left empty says nothing: tidy it.
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.dirname(path))  # fails, and is kept, while anything is in it
            else:
                atomic_write(path, text)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror or exc}")
    if failed:
        raise CommandExecutionError("clean: could not put back " + "; ".join(failed))
    forget_originals(state_dir)
    return changes
