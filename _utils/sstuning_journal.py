"""
Everything this package writes goes through here: read a file as text,
describe a change as a diff, replace a file atomically, keep the originals
that ``clean`` puts back (``<state_dir>/originals.json``), and the lock that
keeps two applies on one box from interleaving. No Salt here: every function
takes the paths it works on.
"""

import base64
import contextlib
import difflib
import fcntl
import json
import os
import stat
import tempfile

from salt.exceptions import CommandExecutionError

import sstuning_procfs as procfs

_TEMP_MARK = ".sst-"
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


class NotRegularFile(CommandExecutionError):
    """A path that is not a plain file of its own where one is needed."""


def read_text(path):
    """The text of a regular file (bytes that are not UTF-8 kept as
    surrogates, to be written back as they were), or None when it does not
    exist. Anything else (a directory, a named pipe, a device) raises
    NotRegularFile instead of being read: a pipe would block forever."""
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise NotRegularFile(f"{path} is a directory, not a file")
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise NotRegularFile(f"{path} is {_KINDS.get(stat.S_IFMT(kind), 'not a regular file')}, not a file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="surrogateescape")
    finally:
        os.close(fd)


def read_managed(path):
    """The text of a file this package rewrites, or None when it does not
    exist. One rule for links: a symbolic link or a file with more than one
    hard link is refused, never followed or read, so nothing outside the
    managed path is read into output or copied into a file this package
    writes. Raises NotRegularFile with what to do."""
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
    return read_text(path)


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
def originals_path(state_dir):
    return os.path.join(state_dir, "originals.json")


def load_originals(state_dir):
    """``{"sysctls": {key: value}, "files": {path: base64 or None}}``."""
    path = originals_path(state_dir)
    text = read_managed(path)
    if not text:
        return {"sysctls": {}, "files": {}}
    try:
        return json.loads(text)
    except ValueError:
        raise CommandExecutionError(f"{path} is corrupt; move it away and run again")


def remember(state_dir, originals, sysctls=None, files=None):
    """Record the first value of each key and the first content of each file
    (None: it did not exist); later changes never overwrite a record."""
    changed = False
    for key, value in (sysctls or {}).items():
        if key not in originals["sysctls"]:
            originals["sysctls"][key] = value
            changed = True
    for path in files or ():
        if path not in originals["files"]:
            raw = None
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as handle:
                    raw = base64.b64encode(handle.read()).decode()
            originals["files"][path] = raw
            changed = True
    if changed:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        atomic_write(originals_path(state_dir), json.dumps(originals, indent=1, sort_keys=True), mode=0o600)


def original_text(raw):
    return base64.b64decode(raw).decode("utf-8", errors="surrogateescape")


def forget_originals(state_dir):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(originals_path(state_dir))


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


def restore(state_dir, proc_root, test):
    """Put back what the originals record: live sysctls first, then every
    file byte for byte (removing those this package created). Returns
    ``{key or path: change}``; under ``test`` only reports. Call under the lock."""
    originals = load_originals(state_dir)
    changes, failed = {}, []
    for key, value in originals["sysctls"].items():
        current = procfs.read_or(proc_root, key)
        if current is None or current == value:
            continue
        changes[key] = {"old": current, "new": value}
        if not test:
            try:
                procfs.write(proc_root, key, value)
            except OSError as exc:
                failed.append(f"{key}: {exc.strerror or exc}")
    for path, raw in originals["files"].items():
        current = read_managed(path)  # a link planted since is refused, not followed
        if raw is None:
            if current is not None:
                changes[path] = {"old": "managed", "new": "removed (it did not exist before)"}
                if not test:
                    os.unlink(path)
            continue
        content = original_text(raw)
        if current != content:
            changes[path] = {"diff": file_change(path, content, current)["diff"]}
            if not test:
                atomic_write(path, content)
    if failed:
        raise CommandExecutionError("clean: could not put back " + "; ".join(failed))
    if not test:
        forget_originals(state_dir)
    return changes
