"""Atomic writes that end with ordinary file modes.

Everything almak writes (checkpoints, adapters, ``eval --out`` and ``bench --out`` folders, translations, the
model cache) is first written under a temporary name beside its destination and renamed into place when
complete, so that a crash never leaves half a file. The temporary name, ``.<name>.tmp-<pid>-<random>`` (``.old-`` for the
previous version during a replace), records the process that writes it: a process killed outright (SIGKILL, a
power cut) leaves it behind, and the next write of the same destination deletes every one whose process is gone
(:func:`clean_stale`). A Python exception or SIGINT removes it at once. Temporary files and folders are created private
(``mkstemp`` gives 0600, ``mkdtemp`` 0700) and safetensors writes its files 0600, so before the rename
:func:`ordinary_modes` gives every file and folder the mode a plain ``open()`` / ``mkdir()`` would have under
the current umask (0644 / 0755 under umask 0022): a checkpoint handed to a server that runs as another user
can then be read, and a user whose umask is 0077 still gets private files.

>>> write_text_atomic(Path("out.txt"), "hello\\n")                               # doctest: +SKIP
>>> write_dir_atomic(Path("run"), lambda tmp: (tmp / "a.json").write_text("{}"))  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from almak.errors import AlmakError

__all__ = ["umask", "ordinary_modes", "clean_stale", "temp_dir_beside", "publish_dir", "write_dir_atomic",
           "write_text_atomic", "check_new_output", "check_writable_place"]


def umask() -> int:
    """The process's current umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_modes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes ``open()`` / ``mkdir()`` would:
    0666 / 0777 without the umask's bits. Symbolic links are left alone."""
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        path.chmod(file_mode)
        return
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)
        for name in dirs:
            p = os.path.join(root, name)
            if os.path.islink(p):
                dirs.remove(name)


def _prefix(out: Path, kind: str = "tmp") -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Delete the temporary files and folders that writes of ``out`` by processes no longer running left beside it
    (they were killed before they could clean up); returns what it deleted."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    gone = []
    if not out.parent.is_dir():
        return gone
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            gone.append(entry)
    return gone


def temp_dir_beside(out: Path) -> Path:
    """A new empty private folder in ``out``'s parent (created if missing), to be renamed to ``out``; stale ones
    of killed writers go first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    return Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))


def publish_dir(tmp: Path, out: Path) -> None:
    """Give the finished folder ``tmp`` ordinary modes and rename it to ``out``; an existing ``out`` is moved
    aside first and deleted after, so that ``out`` is always either the old or the new complete folder."""
    ordinary_modes(tmp)
    out = Path(out)
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
        os.replace(out, old / "x")
        try:
            os.replace(tmp, out)
        except BaseException:  # interrupted between the two renames: put the old version back
            if not (out.exists() or out.is_symlink()):
                os.replace(old / "x", out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _remove_own(out: Path) -> None:
    """Delete this process's temporary files and folders for ``out``, however far their making got (an interrupt
    can land between ``mkdtemp`` returning and its caller holding the name)."""
    for entry in out.parent.glob(f"{glob.escape(_prefix(out))}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def write_dir_atomic(out: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write the files of ``out`` into a temporary folder beside it, then publish that folder as
    ``out`` (replacing what is there); on any error the temporary folder goes and ``out`` is untouched."""
    out = Path(out)
    try:
        tmp = temp_dir_beside(out)
        fill(tmp)
        publish_dir(tmp, out)
    except BaseException:
        _remove_own(out)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it over ``path`` when complete,
    with the mode ``open()`` would give it."""
    path = Path(path)
    clean_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        ordinary_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        _remove_own(path)
        raise


def check_new_output(path: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work is done, an output that cannot or must not be written: one that exists (unless
    ``overwrite``), in a folder that does not exist or cannot be written, or one whose replacing would delete one of
    ``inputs`` (the same path, or a folder holding it)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise AlmakError(f"{str(path)!r} exists; pass --overwrite to replace it")
    check_writable_place(path, inputs)


def check_writable_place(path: Path, inputs: tuple = ()) -> None:
    """The parts of :func:`check_new_output` that hold with or without ``--overwrite`` (and for a resumed run)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AlmakError(f"the folder of {str(path)!r} does not exist")
    target = path.resolve()
    for item in inputs:
        if not item or not Path(item).expanduser().exists():
            continue  # an alias or a hub id: nothing local to protect
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise AlmakError(f"{str(path)!r} is {'' if source == target else 'a folder holding '}the input "
                             f"{str(item)!r}; writing there would replace it: choose another output path")
    try:  # the writes happen at the end: find out now whether they can
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise AlmakError(f"cannot write in {str(path.parent)!r} ({e.strerror or e})") from None
