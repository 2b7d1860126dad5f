"""Write a commit's tree to a folder, read through GitPython's object database.

The mirror's objects are read by one long-lived `git cat-file` process instead of a
`git read-tree` plus `git checkout-index` per revision: an agent woken by a webhook then
spends its CPU on the fetch alone. Names come from the (remote, untrusted) repository, so
each is checked the way git's checkout checks them before anything is written."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import git
from git.objects.base import IndexObject

SYMLINK_MODE = 0o120000


class UnsafeTreeError(ValueError):
    """The tree names a path that cannot be written inside the snapshot."""


def safe_name(name: str) -> bool:
    """One path component as git allows it in a checkout: no separators, no NUL, never
    '.', '..' or '.git'."""
    return (
        name not in ("", ".", "..")
        and name.lower() != ".git"
        and "/" not in name
        and "\0" not in name
    )


def write_tree(tree: git.Tree, dest: Path) -> None:
    """Materialise tree under dest (an empty folder). Submodules become empty folders, as
    in a checkout without --recurse-submodules."""
    pending: list[tuple[git.Tree, Path]] = [(tree, dest)]
    while pending:  # iterative: a hostile tree may nest deeper than Python's recursion
        current, folder = pending.pop()
        try:
            items: list[IndexObject] = list(current)
        except ValueError as exc:  # GitPython refuses some names itself (e.g. '..')
            raise UnsafeTreeError(f"unsafe path in {current.path or 'the root'}: {exc}") from None
        for item in items:
            name = os.fspath(item.path).rpartition("/")[2]  # Submodule.name needs .gitmodules
            if not safe_name(name):
                raise UnsafeTreeError(f"unsafe path {item.path!r} in the tree")
            target = folder / name
            if isinstance(item, git.Tree):
                target.mkdir()
                pending.append((item, target))
            elif isinstance(item, git.Blob):
                _write_blob(item, target)
            else:  # a submodule (gitlink)
                target.mkdir()


def _write_blob(blob: git.Blob, target: Path) -> None:
    if stat.S_IFMT(blob.mode) == SYMLINK_MODE:
        # a link leading out of the repo is refused later, by whoever resolves it
        os.symlink(os.fsdecode(blob.data_stream.read()), target)
        return
    with open(target, "xb") as handle:  # x: never through an existing name
        shutil.copyfileobj(blob.data_stream, handle)
    if blob.mode & 0o111:
        os.chmod(target, 0o755)
