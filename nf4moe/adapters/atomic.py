"""Atomic checkpoint directories: every writer writes beside the target and swaps the whole directory in.

Data flow of one save (``atomic_directory``): a fresh directory ``.<name>.nf4moe-tmp-<hex>`` is made
beside the target (same filesystem, so renames are atomic) -> the writer fills it -> every file is
checked (safetensors header against the file size, JSON parses: a short write fails here) -> a
manifest (name, size, sha256 of each file) is written last -> files and directory are fsynced ->
swap: ``target`` -> ``.<name>.nf4moe-old``, temporary -> ``target``, fsync the parent, remove the old.
Files of the old directory that the writer does not own (a tokenizer saved beside the weights) are
hard-linked into the new one first, so nothing of the user's is dropped.

Any failure before the second rename leaves the old directory whole at ``target`` (the temporary
one is removed; a failed second rename is rolled back).  A process killed between the two renames
leaves no ``target`` but the old directory at ``.<name>.nf4moe-old``: loaders say so
(:func:`check_interrupted`) and the next save to ``target`` renames it back before writing.  A
kill at any other point leaves ``target`` whole (old before the second rename, new after it).
The cost: the sha256 of every file is computed once on save and once on load (disk-speed reads).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

MANIFEST_NAME = "nf4moe_manifest.json"
MANIFEST_FORMAT = "nf4moe-manifest"
_ASIDE_SUFFIX = ".nf4moe-old"
_TMP_TAG = ".nf4moe-tmp-"
_CHUNK = 8 << 20


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint written before manifests existed: loaded after checking only what its own files list."""


# ---------------------------------------------------------------------------------------------- file checks
def check_safetensors(path: str) -> None:
    """Raise ValueError naming ``path`` if its safetensors header does not account for exactly its bytes.

    Reads the 8-byte header length and the JSON header only: a file cut short (an interrupted copy,
    a full disk) or one that is not safetensors at all is named here instead of failing later in
    safetensors' own header parser without a file name.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, less than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path}: truncated or corrupt safetensors file: its header claims {n} bytes, "
                             f"the file has {size - 8} after the length field")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: corrupt safetensors file: unreadable header ({type(e).__name__}: {e})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{path}: truncated safetensors file: {size} bytes, its header needs {expected}")
    if size > expected:
        raise ValueError(f"{path}: corrupt safetensors file: {size - expected} bytes beyond the {expected} its header "
                         "accounts for")


def read_json(path: str):
    """json.load naming ``path`` when the file is cut short or not JSON."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: truncated or corrupt JSON ({len(text)} characters; {e})") from None


def _check_written(path: str) -> None:
    if path.endswith(".safetensors"):
        check_safetensors(path)
    elif path.endswith(".json"):
        read_json(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Relative paths of the regular files below ``directory``, sorted."""
    out = []
    for root, _, names in os.walk(directory):
        out.extend(os.path.relpath(os.path.join(root, n), directory) for n in names)
    return sorted(out)


# ---------------------------------------------------------------------------------------------- manifest
def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST_NAME))


def verify_manifest(directory: str) -> list[str]:
    """Check every file the manifest of ``directory`` lists (size, then sha256); return their names.

    Raises ValueError naming each missing, truncated or altered file.  Files the manifest does not
    list (a tokenizer saved beside the checkpoint) are not checked.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise ValueError(f"{path}: not an nf4moe manifest (expected format {MANIFEST_FORMAT!r} and a 'files' table)")
    files = manifest["files"]
    problems = []
    for name, meta in files.items():
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != meta["size"]:
            size = os.path.getsize(p)
            problems.append(f"{name} has {size} bytes, the manifest {meta['size']}"
                            + (" (truncated)" if size < meta["size"] else ""))
    if not problems:  # hashes only when every size is right: a short file needs no hashing to be refused
        problems = [f"{name}: sha256 differs from the manifest (altered or corrupt)" for name, meta in files.items()
                    if _sha256(os.path.join(directory, name)) != meta["sha256"]]
    if problems:
        raise ValueError(f"{directory} is not the complete checkpoint its {MANIFEST_NAME} describes: "
                         + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return sorted(files)


def _write_manifest(directory: str, names: list[str]) -> None:
    files = {n: {"size": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
             for n in names}
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "files": files}, fh, indent=2, sort_keys=True)
    read_json(path)


# ---------------------------------------------------------------------------------------------- interrupted saves
def aside_path(target: str) -> str:
    """Where a save keeps the previous ``target`` between its two renames."""
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}{_ASIDE_SUFFIX}")


def check_interrupted(target: str) -> None:
    """Raise FileNotFoundError if ``target`` is missing because a save was killed between its two renames."""
    aside = aside_path(target)
    if not os.path.exists(target) and os.path.isdir(aside):
        raise FileNotFoundError(
            f"{target} does not exist, but {aside} does: an nf4moe save to {target} was interrupted between moving "
            f"the previous checkpoint aside and moving the new one in. {aside} is that previous checkpoint, whole: "
            f"rename it back to {target} (the next save to {target} also does this before writing)")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: str) -> None:
    """Remove a temporary or set-aside directory (a leftover is harmless: the next save removes it)."""
    shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a filesystem without hard links: a copy keeps the file just the same
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str, owned: Callable[[str], bool]) -> None:
    """Link the entries of ``old`` that the writer does not own into ``new`` (the user's files stay)."""
    for name in sorted(os.listdir(old)):
        if owned(name) or name == MANIFEST_NAME or os.path.lexists(os.path.join(new, name)):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _prepare(target: str) -> None:
    """Undo what an interrupted earlier save left: restore a set-aside target, drop temporaries and old copies."""
    parent, name = os.path.split(target)
    aside = aside_path(target)
    if os.path.isdir(aside):
        if os.path.exists(target):  # killed after the new one was in place: the old copy is garbage
            _discard(aside)
        else:
            os.rename(aside, target)
            warnings.warn(f"an earlier nf4moe save to {target} was interrupted between its two renames; restored the "
                          f"checkpoint that was there before from {aside}", stacklevel=4)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{_TMP_TAG}"):
            _discard(os.path.join(parent, entry))


@contextmanager
def atomic_directory(save_directory: str | os.PathLike, owned: Callable[[str], bool], what: str) -> Iterator[str]:
    """Yield an empty directory beside ``save_directory``; when the block ends cleanly, swap it in.

    ``owned(name)``: whether an entry of an existing ``save_directory`` is the writer's own (it is
    replaced, not carried over).  ``what`` names the writer in error messages.  On any exception the
    previous ``save_directory`` is left as it was.  Concurrent saves to one directory are not supported.
    """
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{what}: save_directory {target} exists and is not a directory")
    parent, name = os.path.split(target)
    if not name:
        raise ValueError(f"{what}: save_directory {target} is a filesystem root; a checkpoint needs its own directory")
    os.makedirs(parent, exist_ok=True)
    _prepare(target)
    tmp = os.path.join(parent, f".{name}{_TMP_TAG}{secrets.token_hex(4)}")
    os.mkdir(tmp)
    aside = aside_path(target)
    moved_aside = placed = False
    try:
        yield tmp
        written = _files(tmp)
        for rel in written:
            _check_written(os.path.join(tmp, rel))
        _write_manifest(tmp, written)
        for rel in written + [MANIFEST_NAME]:
            _fsync_file(os.path.join(tmp, rel))
        if os.path.isdir(target):
            _carry_over(target, tmp, owned)
        for root, _, _ in os.walk(tmp, topdown=False):  # subfolders carried over too, then the top one
            _fsync_dir(root)
        if os.path.isdir(target):
            os.rename(target, aside)
            moved_aside = True
        os.rename(tmp, target)
        placed = True
        _fsync_dir(parent)
    finally:
        if not placed:
            _rollback(tmp, target if moved_aside else None)
    if moved_aside:
        _discard(aside)


def _rollback(tmp: str, moved_target: str | None) -> None:
    """A save failed before the new directory was in place: put the old one back, drop the temporary."""
    if moved_target is not None:
        os.rename(aside_path(moved_target), moved_target)
    _discard(tmp)
