"""Every path a command writes, checked before any work, and written so that nothing is ever half there.

One guard (``check_outputs``) for all outputs of a run: a folder (``--save_model``, ``--output_dir``) or a file
(``--report``, ``--plot``, an exported GGUF). Before any work it refuses, with one line naming the fix, an
output that cannot be written, whose format is unknown, that overlaps the input model, or that overlaps another
output of the same run. Writing is atomic: a folder is built beside its target and swapped in
(``replace_folder``), a file is written to a temporary name and renamed (``write_file_atomically``), so a kill
at any instant leaves either the old complete output or the new complete one at the target name. Leftovers of
an interrupted earlier run (``.<name>.partial-*``) are found, named, and removed with ``--overwrite``.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


class UnsafeSaveError(ValueError):
    """The output cannot or must not be written (the input model, a non-empty folder, a read-only place)."""


PARTIAL_MARK = ".partial-"  # temporary siblings are named ".<target name>.partial-<random>"


@dataclass(frozen=True)
class Output:
    """One path a run will write. ``kind`` is "folder" or "file"; ``formats``: the file suffixes accepted
    (empty: any)."""

    flag: str
    path: Path
    kind: str = "file"
    formats: tuple[str, ...] = ()

    @classmethod
    def folder(cls, flag: str, path: str | os.PathLike) -> "Output":
        return cls(flag, Path(path).expanduser(), "folder")

    @classmethod
    def file(cls, flag: str, path: str | os.PathLike, formats: Iterable[str] = ()) -> "Output":
        return cls(flag, Path(path).expanduser(), "file", tuple(formats))


def plot_formats() -> tuple[str, ...]:
    """The file suffixes matplotlib can write (png, pdf, svg, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return tuple(sorted(FigureCanvasAgg(Figure()).get_supported_filetypes()))


def real_path(path: Path, flag: str) -> Path:
    """``path`` made absolute with its symbolic links followed (a link is written where it points); a link
    loop is refused."""
    try:
        return Path(os.path.abspath(path)).resolve(strict=False)
    except (RuntimeError, OSError) as error:  # Python < 3.13 raises RuntimeError on a loop
        raise UnsafeSaveError(f"{flag} {path} cannot be resolved ({_reason(error)}): it is a symbolic link loop; "
                              f"remove the link or choose another {flag}") from None


def overlaps(target: Path, origin: Path) -> bool:
    """Whether writing ``target`` would write over, into or above ``origin``."""
    try:
        a, b = target.resolve(), origin.resolve()
    except (OSError, RuntimeError):
        return False
    return a == b or a in b.parents or b in a.parents


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | os.PathLike, flag: str = "--save_model") -> None:
    """Refuse, before any work, a place where ``folder`` cannot be created or written: a file on the way, no
    permission, a read-only file system."""
    existing = _nearest_existing(Path(folder).expanduser().absolute())
    if not existing.is_dir():
        raise UnsafeSaveError(f"cannot create {folder}: {existing} is a file, not a folder: choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".structprune-write-check-", dir=existing))
    except OSError as error:
        raise UnsafeSaveError(f"cannot write under {existing} ({_reason(error)}): choose another {flag}") from None


def leftovers(target: Path) -> list[Path]:
    """Temporary siblings of ``target`` left by an interrupted earlier save (``.<name>.partial-*``)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob(f".{target.name}{PARTIAL_MARK}*"))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def handle_leftovers(target: Path, overwrite: bool, log: Callable[[str], None]) -> None:
    """Name what an interrupted earlier run left beside ``target``; remove it with ``overwrite``."""
    found = leftovers(target)
    if not found:
        return
    mib = sum(_size(p) for p in found) / 2 ** 20
    names = ", ".join(p.name for p in found)
    if overwrite:
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        log(f"removed {len(found)} leftover(s) of an interrupted earlier save beside {target} ({mib:.1f} MiB): {names}")
    else:
        log(f"note: {len(found)} leftover(s) of an interrupted earlier save lie beside {target} ({mib:.1f} MiB): "
            f"{names}; --overwrite removes them")


def _check_one(output: Output, overwrite: bool) -> Path:
    target = real_path(output.path, output.flag)
    if output.kind == "folder":
        if target.exists() and not target.is_dir():
            raise UnsafeSaveError(f"{output.flag} {output.path} is a file, not a folder: choose another {output.flag}")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise UnsafeSaveError(f"{output.flag} {output.path} exists and is not empty: choose another folder, or "
                                  f"pass --overwrite (overwrite=True from Python) to replace it")
        if target.is_dir():
            check_writable(target, output.flag)
    else:
        if target.is_dir():
            raise UnsafeSaveError(f"{output.flag} {output.path} is a folder: name a file")
        suffix = target.suffix.lower().lstrip(".")
        if output.formats and suffix not in output.formats:
            raise UnsafeSaveError(f"{output.flag} {output.path}: unknown format '{suffix or '(none)'}': end the name "
                                  f"with one of {', '.join('.' + f for f in output.formats)}")
        if target.exists() and not overwrite:
            raise UnsafeSaveError(f"{output.flag} {output.path} exists: choose another file, or pass --overwrite to "
                                  f"replace it")
    check_writable(target.parent, output.flag)
    return target


def check_outputs(outputs: Iterable[Output], inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, log: Callable[[str], None] | None = None) -> list[Path]:
    """The resolved targets of ``outputs``, or an UnsafeSaveError naming the fix; writes nothing but removes
    leftovers of interrupted saves when ``overwrite``.

    Refused: an output over, into or above an input (``inputs``: the places the model and data come from); two
    outputs over, into or above one another (files inside an output folder included); a target that exists
    without ``overwrite``; a place that cannot be written; a file format not in the output's ``formats``."""
    outputs = [o for o in outputs if o.path is not None and str(o.path) not in ("", ".")]
    origins = [Path(str(s)).expanduser() for s in inputs if s]
    targets = []
    for output in outputs:
        for origin in origins:
            if origin.exists() and overlaps(output.path, origin):
                raise UnsafeSaveError(f"refusing to write {output.flag} {output.path} over, into or above the input "
                                      f"model or data at {origin}: choose another {output.flag}")
        targets.append(_check_one(output, overwrite))
    for i, (first, a) in enumerate(zip(outputs, targets)):
        for second, b in list(zip(outputs, targets))[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise UnsafeSaveError(f"{first.flag} {first.path} and {second.flag} {second.path} overlap: one would "
                                      f"write over the other; choose separate places")
    for output, target in zip(outputs, targets):
        if output.kind == "folder":
            handle_leftovers(target, overwrite, log or (lambda line: print(line, file=sys.stderr)))
    return targets


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (so it survives a power loss, not only a kill);
    a file system that refuses is left as it is."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder``, then the folder entries."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync(path)
    fsync(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``, replacing what is there.

    Where the system can swap two names atomically, the new folder and the old one trade places in one step and
    the old one (now at the staging name) is deleted; a kill at any instant leaves the old or the new folder at
    ``target``. Elsewhere the old folder first moves aside to a ``.partial-`` name, which a kill between the two
    renames leaves for the next run to name."""
    _fsync_tree(staging)
    if target.is_dir() and not target.is_symlink():
        if exchange(staging, target):
            fsync(target.parent)
            shutil.rmtree(staging, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARK}old-", dir=target.parent))
        os.replace(target, aside)
        os.replace(staging, target)
        fsync(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(staging, target)
    fsync(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain mkdir / open would (mkdtemp and safetensors use 0700 /
    0600, which would hide the model from other users whatever the umask says)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def replace_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; once the block ends without error it is published at
    ``target`` (``publish``). On any error the temporary folder is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARK}", dir=target.parent))
    try:
        yield staging
        publish_modes(staging)
        publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def replace_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; once the block ends without error it is renamed onto
    ``target`` in one step (the umask's usual mode). On any error ``target`` is left as it was."""
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}{PARTIAL_MARK}", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        fsync(temporary)
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, target)
        fsync(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(target: str | os.PathLike, text: str) -> Path:
    """``target`` holding ``text``, written under a temporary name and renamed (never half written)."""
    with replace_file(target) as temporary:
        temporary.write_text(text)
    return Path(target).expanduser()
