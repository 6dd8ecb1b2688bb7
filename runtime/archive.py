"""The one way edgeopt unpacks a tar archive: member by member, checked before anything is written.

Every tar edgeopt reads goes through `safe_extract`: bundles opened by the runtime, archives the
SDK unpacks before profiling, and the device copy the receive script unpacks on the device (that
script embeds this module's source, so the module uses the standard library only and must stay
importable on every Python the runtime supports, 3.10 and newer).

The checks are sufficient on their own, so they hold on Pythons without `tarfile.data_filter`
(3.11.2 on Debian 12 and Raspberry Pi OS) and against that filter's own known bypasses:

- names: no absolute paths, drive letters or '..' (a backslash counts as a separator on Windows);
  no name twice;
- types: folders, regular files, and links that stay inside; no devices, fifos or sparse files;
- links: a member whose path goes through a symbolic link member is refused, as is a symbolic
  link whose target leaves the destination or goes through another link; a hard link must name
  an earlier file of the archive (it is unpacked as a copy of it);
- caps: the total unpacked bytes and the member count, against tar and gzip bombs;
- writes: folders are created component by component and must be real folders (not links),
  files are created with O_EXCL and O_NOFOLLOW, and once everything is written every symbolic
  link must resolve inside the destination.

On an error the destination may hold part of the archive: extract into a fresh staging folder
and remove it on failure.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from typing import IO, Tuple

from edgeopt.runtime.errors import BundleError

__all__ = ["MAX_BYTES", "MAX_MEMBERS", "safe_extract"]

MAX_BYTES = 4 << 30
"""Default cap on the bytes an archive unpacks to (4 GiB: far above any edge model's bundle)."""
MAX_MEMBERS = 10_000
"""Default cap on the entries of an archive (a bundle has a few dozen)."""

_Member = Tuple[tarfile.TarInfo, Tuple[str, ...]]
_HINT = "refusing to unpack it; only open bundles written by `edgeopt build`"
_CHUNK = 1 << 20


def safe_extract(
    archive: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_BYTES,
    max_members: int = MAX_MEMBERS,
    use_data_filter: bool = True,
) -> None:
    """Unpack the tar (optionally compressed) at `archive` into the existing folder `destination`.

    Raises BundleError naming the archive and the member (or the cap) on anything unsafe, and on
    a damaged archive. `use_data_filter=False` skips `tarfile.data_filter` as an extra check even
    where this Python has it (the checks here do not depend on it).
    """
    archive = os.fspath(archive)
    root = os.path.realpath(os.fspath(destination))
    data_filter = getattr(tarfile, "data_filter", None) if use_data_filter else None
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _scan(tar, archive, max_bytes, max_members)
            _check_links(members, archive)
            if data_filter is not None:
                for member, _ in members:
                    try:
                        data_filter(member, root)
                    except tarfile.FilterError as exc:
                        raise BundleError(f"{archive}: member {member.name!r} is unsafe ({exc})", hint=_HINT) from None
            for member, parts in members:
                _write(tar, member, parts, root, archive)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleError(f"{archive}: cannot unpack ({exc})", hint="the archive is damaged; copy it again") from None
    for member, parts in members:
        if member.issym():
            resolved = os.path.realpath(os.path.join(root, *parts))
            if not _within(resolved, root):
                raise BundleError(f"{archive}: link {member.name!r} resolves to {resolved}, outside the bundle", hint=_HINT)


def _scan(tar: tarfile.TarFile, archive: str, max_bytes: int, max_members: int) -> list[_Member]:
    """Every member with its normalized path parts; refuses unsafe names and types and enforces the caps."""
    members: list[_Member] = []
    sizes: dict[tuple[str, ...], tuple[int, bool]] = {}
    total = count = 0
    while True:
        member = tar.next()
        if member is None:
            return members
        count += 1
        if count > max_members:
            raise BundleError(
                f"{archive}: more than {max_members:,} members (the cap on archive entries)",
                hint=_HINT + ", or raise max_members if this archive is yours",
            )
        parts = _parts(member.name, member, archive)
        if not parts:
            if member.isdir():
                continue
            raise BundleError(f"{archive}: member {member.name!r} has no name", hint=_HINT)
        if parts in sizes:
            raise BundleError(f"{archive}: member {member.name!r} appears twice", hint=_HINT)
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise BundleError(f"{archive}: member {member.name!r} is a device or fifo", hint=_HINT)
        if member.issparse():
            raise BundleError(f"{archive}: member {member.name!r} is a sparse file", hint=_HINT)
        size = member.size if member.isfile() else 0
        if member.islnk():
            target = _parts(member.linkname, member, archive)
            if target not in sizes or not sizes[target][1]:
                raise BundleError(
                    f"{archive}: hard link {member.name!r} -> {member.linkname!r} does not name an earlier file of the archive",
                    hint=_HINT,
                )
            size = sizes[target][0]
        total += size
        if total > max_bytes:
            raise BundleError(
                f"{archive}: unpacks to more than {_gib(max_bytes)} (the cap on unpacked bytes; member {member.name!r} "
                f"declares {size:,} bytes)",
                hint=_HINT + ", or raise max_bytes if this archive is yours",
            )
        sizes[parts] = (size, member.isfile() or member.islnk())
        members.append((member, parts))


def _parts(name: str, member: tarfile.TarInfo, archive: str) -> tuple[str, ...]:
    """The path components of a member name (or hard link target), refusing any that could leave the destination."""
    if "\x00" in name:
        raise BundleError(f"{archive}: member {member.name!r} has a NUL in {name!r}", hint=_HINT)
    if os.altsep == "/":  # Windows: a backslash separates folders there, so it splits the name too
        name = name.replace("\\", "/")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/"):
        raise BundleError(f"{archive}: member {member.name!r} has an absolute path {name!r}", hint=_HINT)
    if parts and len(parts[0]) >= 2 and parts[0][1] == ":" and parts[0][0].isalpha():
        raise BundleError(f"{archive}: member {member.name!r} has a drive letter in {name!r}", hint=_HINT)
    if ".." in parts:
        raise BundleError(f"{archive}: member {member.name!r} points outside the bundle ('..')", hint=_HINT)
    return parts


def _check_links(members: list[_Member], archive: str) -> None:
    """No member path through a symbolic link member; symbolic links stay inside, through no other link."""
    symlinks = {parts for member, parts in members if member.issym()}
    for member, parts in members:
        for depth in range(1, len(parts)):
            if parts[:depth] in symlinks:
                raise BundleError(
                    f"{archive}: member {member.name!r} goes through the link {'/'.join(parts[:depth])!r}", hint=_HINT
                )
        if not member.issym():
            continue
        link = member.linkname
        if os.altsep == "/":
            link = link.replace("\\", "/")
        if not link or link.startswith("/") or "\x00" in link or (len(link) >= 2 and link[1] == ":"):
            raise BundleError(f"{archive}: link {member.name!r} -> {link!r} points outside the bundle", hint=_HINT)
        path = list(parts[:-1])
        for part in link.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not path:
                    raise BundleError(f"{archive}: link {member.name!r} -> {link!r} points outside the bundle", hint=_HINT)
                path.pop()
                continue
            path.append(part)
            if tuple(path) in symlinks:
                raise BundleError(f"{archive}: link {member.name!r} -> {link!r} goes through the link {'/'.join(path)!r}", hint=_HINT)


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...], root: str, archive: str) -> None:
    if member.isdir():
        _folder(root, parts, archive)
        return
    path = os.path.join(_folder(root, parts[:-1], archive), parts[-1])
    if member.issym():
        os.symlink(member.linkname, path)
        return
    if member.islnk():
        source = os.open(os.path.join(root, *_parts(member.linkname, member, archive)), os.O_RDONLY | _NOFOLLOW | _BINARY)
        with os.fdopen(source, "rb") as stream:
            _copy(stream, path, member.mode)
        return
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file member always has data
    with stream:
        _copy(stream, path, member.mode)


def _folder(root: str, parts: tuple[str, ...], archive: str) -> str:
    """root/parts, creating each missing component; every component must be a real folder, not a link."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise BundleError(f"{archive}: {path} is in the way of a folder (a file or link)", hint=_HINT)
    return path


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _copy(stream: IO[bytes], path: str, mode: int) -> None:
    """Write a new file at path (never replacing or following anything there) from stream."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o755 if mode & 0o111 else 0o644)
    with os.fdopen(handle, "wb") as out:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                return
            out.write(chunk)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _gib(count: int) -> str:
    return f"{count / (1 << 30):g} GiB" if count >= 1 << 30 else f"{count:,} bytes"
