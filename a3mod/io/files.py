"""Every write a3mod makes to a user's disk goes through here: what may be replaced, atomic publish, locks.

Promises (README "What a3mod promises about your files"):
- `check_output_dir` runs before any work: an existing folder is replaced only with overwrite=True and only when
  it is an a3mod checkpoint (it holds a3mod.json and no subfolders) or empty; never the current directory or one
  of its ancestors, the home directory or one of its ancestors, a filesystem root, a symbolic link, or a folder
  that is (or contains) the model being compressed.
- `publish` puts a finished staging folder at the output path so that, at every instant, the path holds either
  the complete old checkpoint or the complete new one: one atomic exchange (Linux renameat2 RENAME_EXCHANGE),
  else rename-old-aside, rename-new-in, delete-old-last; a run killed in between is repaired by the next writer
  of that path (`recover`: the old checkpoint is renamed back, half-written staging folders are removed).
- `output_lock` (flock on a sibling lock file; released by the kernel when the process dies) keeps two writers
  off one output path. Single files (statistics, JSON results) are written to a temporary sibling and renamed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError

SIDECAR = "a3mod.json"
EXPORT_RECORD = "a3mod_export.json"   # an export to another format (a3mod.export) lists the files it wrote here
_STAGE, _OLD, _LOCK = ".a3mod-tmp-", ".a3mod-old-", ".a3mod-lock"
_HELD: dict[str, list] = {}           # registry of output locks this process holds: path -> [fd, depth, pid]


# ----------------------------------------------------------------------------------------------- checks
def resolved(path: str | os.PathLike) -> Path:
    if path is None or not str(path).strip():
        raise CheckpointError(f"output path {path!r} is empty; give a directory name")
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _source_dirs(sources) -> list[Path]:
    """Folders of the given model sources that exist locally (a file stands for its folder)."""
    out = []
    for s in sources or ():
        if not s:
            continue
        p = Path(os.path.expanduser(os.fspath(s)))
        if p.exists():
            out.append((p.parent if p.is_file() else p).resolve())
    return out


def _is_within(a: Path, b: Path) -> bool:
    """a == b or a lies inside b."""
    return a == b or b in a.parents


def _check_parents(p: Path) -> None:
    for anc in p.parents:
        if anc.exists() and not anc.is_dir():
            raise CheckpointError(f"output path {str(p)!r} lies under {str(anc)!r}, which is a file")


def _check_writable(p: Path) -> None:
    """The nearest existing folder above `p` takes a new file (probed: permissions, read-only and virtual
    filesystems); CheckpointError naming it otherwise, before any work."""
    anc = next((a for a in p.parents if a.exists()), None)
    if anc is None:                        # a filesystem root: refused by the checks that follow
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".a3mod-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to {str(anc)!r} ({e.strerror or e}), where output {str(p)!r} would be "
                              f"created; choose an output in a writable directory") from None


def check_output_dir(out: str | os.PathLike, overwrite: bool, sources=()) -> Path:
    """The absolute output path, after refusing (CheckpointError, naming the path) every output a3mod may not
    write: an existing path without overwrite; a file; a path under a file; with overwrite, a folder that is not
    an a3mod checkpoint nor empty, the current directory or an ancestor, the home directory or an ancestor, a
    filesystem root, a symbolic link, or the source model's folder (or one containing it)."""
    p = resolved(out)
    _check_parents(p)
    _check_writable(p)
    if not os.path.lexists(p):
        return p
    if p.is_symlink():
        raise CheckpointError(f"output path {str(p)!r} is a symbolic link; give the real directory")
    if not p.is_dir():
        raise CheckpointError(f"output path {str(p)!r} is a file, not a directory; choose another path")
    if not overwrite:
        raise CheckpointError(f"output dir {str(p)!r} exists; pass overwrite=True (CLI: --overwrite) or another path")
    r = p.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if r == Path(r.anchor) or _is_within(cwd, r):
        raise CheckpointError(f"refusing to replace {str(r)!r}: it is the current directory or one of its ancestors")
    if _is_within(home, r):
        raise CheckpointError(f"refusing to replace {str(r)!r}: it is the home directory or one of its ancestors")
    for s in _source_dirs(sources):
        if _is_within(s, r):
            raise CheckpointError(f"refusing to replace {str(r)!r}: it is (or contains) the source model "
                                  f"{str(s)!r}; write the compressed model somewhere else")
    entries = sorted(os.listdir(r))
    if not entries:
        return p
    if SIDECAR not in entries and EXPORT_RECORD not in entries:
        raise CheckpointError(f"refusing to replace {str(r)!r}: it holds files and is not an a3mod checkpoint (no "
                              f"{SIDECAR}; e.g. {entries[:3]}); overwrite replaces only a3mod checkpoints or empty "
                              f"folders")
    subdirs = [e for e in entries if (r / e).is_dir()]
    if subdirs:
        raise CheckpointError(f"refusing to replace {str(r)!r}: besides an a3mod checkpoint it holds folders a3mod "
                              f"never writes ({subdirs[:3]}); move them first")
    others = other_files(r)
    if others and overwrite != KEEP_OTHERS:
        raise CheckpointError(f"refusing to replace {str(r)!r}: it holds files its {SIDECAR} does not list, which "
                              f"a3mod did not write ({others[:5]}); move them, or pass overwrite='{KEEP_OTHERS}' "
                              f"(CLI: --overwrite --keep-other-files) to keep them beside the new checkpoint")
    return p


KEEP_OTHERS = "keep-others"        # overwrite=KEEP_OTHERS: replace a3mod's files, carry the user's other files over


def other_files(folder: Path) -> list[str]:
    """Files in an a3mod checkpoint folder that its a3mod.json does not list (as checkpoint files or extra files
    a3mod wrote beside them): the user's. A sidecar that cannot be read lists nothing."""
    marker = SIDECAR if (folder / SIDECAR).is_file() else EXPORT_RECORD
    try:
        side = json.loads((folder / marker).read_bytes())
        ours = {marker, *side.get("files", {}), *side.get("extra", [])}
    except (OSError, ValueError, TypeError, AttributeError):
        ours = {marker}
    return sorted(e.name for e in folder.iterdir() if e.is_file() and e.name not in ours)


def check_extra_names(names, reserved=()) -> None:
    """Names of extra files written into a checkpoint folder: plain file names inside it (at most 200 bytes), none
    a3mod writes itself (`reserved`, compared without case), none hidden; and, for a dict, each value text (UTF-8
    encodable) or bytes. CheckpointError naming the first bad one."""
    taken = {r.lower() for r in (*reserved, SIDECAR)}
    for n in names:
        ok = isinstance(n, str) and n and n == os.path.basename(n) and n not in (".", "..") and "\\" not in n \
            and not n.startswith(".") and "\x00" not in n and len(n.encode("utf-8", "replace")) <= 200
        if not ok:
            raise CheckpointError(f"extra file name {n!r} must be a plain file name inside the checkpoint folder "
                                  f"(no path, not hidden, at most 200 bytes)")
        if n.lower() in taken:
            raise CheckpointError(f"extra file name {n!r} is a file a3mod writes itself; choose another name")
        data = names[n] if isinstance(names, dict) else b""
        if not isinstance(data, (str, bytes)) or (isinstance(data, str) and not _encodes(data)):
            raise CheckpointError(f"extra file {n!r}: its content must be text (UTF-8 encodable) or bytes, got "
                                  f"{type(data).__name__}")


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:                   # a lone surrogate
        return False
    return True


# ------------------------------------------------------------------------------------------------ locks
@contextmanager
def output_lock(out: str | os.PathLike):
    """Hold the writer lock of output path `out` (a sibling `.<name>.a3mod-lock`) for the block; reentrant within
    the process. CheckpointError at once when another process holds it."""
    p = resolved(out)
    key = str(p)
    if key in _HELD and _HELD[key][2] == os.getpid():        # (a forked child inherits the registry, not the lock)
        _HELD[key][1] += 1
        try:
            yield p
        finally:
            _HELD[key][1] -= 1
        return
    _check_parents(p)
    lock = p.parent / f".{p.name}{_LOCK}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, p)
    except OSError as e:
        raise CheckpointError(f"cannot write to {str(p.parent)!r} ({e.strerror or e}); choose an output in a "
                              f"writable directory") from None
    _HELD[key] = [fd, 1, os.getpid()]
    try:
        yield p
    finally:
        del _HELD[key]
        _release(lock, fd)


def _acquire(lock: Path, out: Path) -> int:
    try:
        import fcntl
    except ImportError:                              # no flock (Windows): exclusive create, removed on exit
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        except FileExistsError:
            raise CheckpointError(f"another process is writing {str(out)!r} (lock file {str(lock)!r}); if none is "
                                  f"running, delete the lock file") from None
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointError(f"another process is writing {str(out)!r} (it holds {str(lock)!r}); wait for "
                                      f"it to finish or choose another output") from None
            raise
        try:                                         # the file we locked is still the one at the path
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    os.close(fd)


# ---------------------------------------------------------------------------------------------- publish
def staging_dir(out: Path) -> Path:
    """A new empty folder next to `out` where a checkpoint is assembled before `publish`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_STAGE}{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries `a` and `b` (both exist). False where the OS or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def rename(a: Path, b: Path) -> None:
    os.rename(a, b)


def remove_tree(p: Path) -> None:
    shutil.rmtree(p)


def fsync_tree(root: Path) -> None:
    """Flush every file of `root` and the folder itself to disk (so a power cut cannot publish empty files)."""
    for f in [*root.iterdir(), root]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:               # some filesystems refuse fsync on directories
            pass
        finally:
            os.close(fd)


def _fix_permissions(tmp: Path) -> None:
    """The usual permissions (the staging folder is made like any folder, but be explicit for files)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [tmp, *tmp.iterdir()]:
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def publish(tmp: Path, out: Path, overwrite: bool, sources=()) -> None:
    """Put the finished staging folder `tmp` at `out` (see the module docstring); the caller holds the lock.
    `out`'s eligibility is checked again here, right before anything is renamed."""
    check_output_dir(out, overwrite, sources)
    _fix_permissions(tmp)
    fsync_tree(tmp)
    if not os.path.lexists(out):
        rename(tmp, out)                              # fails (no harm) if someone created `out` meanwhile
        return
    if exchange(tmp, out):                            # out: the new checkpoint; tmp: the old one
        remove_tree(tmp)
        return
    old = out.parent / f".{out.name}{_OLD}{secrets.token_hex(4)}"
    rename(out, old)
    try:
        rename(tmp, out)
    except BaseException:
        rename(old, out)                              # put the old checkpoint back
        raise
    remove_tree(old)


@contextmanager
def staged_output(out_dir: str | os.PathLike, overwrite: bool, sources=()):
    """Write a checkpoint folder safely: hold `out_dir`'s lock, repair leftovers of killed writers, check the
    path may be written, yield an empty staging folder for the files, and publish it when the block succeeds
    (on any error the staging folder is removed and `out_dir` is as it was)."""
    with output_lock(out_dir) as out:
        recover(out)
        check_output_dir(out, overwrite, sources)
        tmp = staging_dir(out)
        try:
            yield tmp
            _carry_others(out, tmp, overwrite)
            publish(tmp, out, overwrite, sources)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _carry_others(out: Path, tmp: Path, overwrite) -> None:
    """overwrite='keep-others': copy the user's files of the old checkpoint into the new one (a name the new
    checkpoint also writes is refused, nothing published)."""
    if overwrite != KEEP_OTHERS or not (out / SIDECAR).is_file():
        return
    for name in other_files(out):
        if os.path.lexists(tmp / name):
            raise CheckpointError(f"{str(out / name)!r} is not a3mod's, and the new checkpoint writes a file of that "
                                  f"name; move it first")
        shutil.copy2(out / name, tmp / name)


def recover(out: str | os.PathLike) -> list[str]:
    """Repair what killed writers of `out` left (the caller holds the lock): an old checkpoint set aside with
    nothing at `out` is renamed back; other set-aside copies and staging folders are removed. Returns messages."""
    p = resolved(out)
    if not p.parent.is_dir():
        return []
    msgs = []
    olds = sorted(p.parent.glob(f".{p.name}{_OLD}*"))
    if olds and not os.path.lexists(p):
        rename(olds[0], p)
        msgs.append(f"restored {str(p)!r} from {olds[0].name} (an interrupted replace had set it aside)")
        olds = olds[1:]
    for d in [*olds, *sorted(p.parent.glob(f".{p.name}{_STAGE}*"))]:
        shutil.rmtree(d, ignore_errors=True)
        msgs.append(f"removed {d.name}, left by an interrupted write of {str(p)!r}")
    for m in msgs:
        warnings.warn(f"a3mod: {m}", stacklevel=3)
    return msgs


# ------------------------------------------------------------------------------------------ single files
def atomic_write(path: str | os.PathLike, data) -> Path:
    """Write `data` (bytes, str, or an iterable of byte blocks for files larger than memory) to `path` through a
    temporary sibling renamed over it: the old file or the new one, never a half-written file."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise CheckpointError(f"{str(p)!r} is a directory; give a file path")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}{_STAGE}{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            for block in ([data.encode() if isinstance(data, str) else data] if isinstance(data, (str, bytes))
                          else data):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
