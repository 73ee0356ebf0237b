"""The tar layers of a registry artifact or image, unpacked each on its own, then merged into one tree.

Inflating is what a layer costs (gzip runs at 200-360 MB/s a core on weights, and
zlib lets go of the GIL), so the layers are unpacked at once, each into a directory
of its own under staging (``pipeline.unpack_layers``, ``unpack_image``). Merging
them is then a rename per file, in one thread, into a tree that still refuses
whatever is unsafe (``MergedTree``: no link followed, every symlink resolved where
it finally stands).

- A model artifact's layers (ModelPack, an ORAS directory) are parts of one model,
  not changes to each other: a file two layers hold is refused (exit 5).
- An image's layers (a KServe modelcar: the weights under ``/models``) each change
  the ones below: a later file replaces an earlier one, ``.wh.NAME`` deletes
  ``NAME`` from the layers below, and ``.wh..wh..opq`` hides everything the
  layers below put in its directory. Each layer writes only what is under the
  subtree asked for (``--oci-path``) and records its whiteouts and what it puts on
  the way to the subtree (``LayerView``); the merge reads the layers from the top
  down (``ImageView``), so the layer with the last word on a path gives it, and a
  path another layer hides or replaces stays behind in staging. A hardlink names
  a file of its own layer: it keeps that layer's bytes, as a container sees them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from fetcher.errors import ArchiveError, local_error
from fetcher.unpack import Budget, SafeTree, show

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

Path_ = tuple[str, ...]


def _prefix(subtree: str) -> Path_:
    return tuple(p for p in subtree.split("/") if p and p != ".")


class ImageView:
    """What the layers above the current one decided, while the layers are merged from the top down."""

    def __init__(self, subtree: str) -> None:
        self.prefix = _prefix(subtree)
        self.kept = 0  # entries kept below the subtree
        self._above: set[Path_] = set()  # decided by a layer above: a lower one never gives them
        self._above_files: set[Path_] = set()  # of those, what is not a directory: nothing lower goes beneath it
        self._hidden: set[Path_] = set()  # whited out by a layer above
        self._opaque: set[Path_] = set()  # directories whose lower contents a layer above hid
        self._mine: set[Path_] = set()  # this layer's paths (their parents too)
        self._mine_files: set[Path_] = set()
        self._new_hidden: set[Path_] = set()  # this layer's whiteouts: they apply to the layers below only
        self._new_opaque: set[Path_] = set()

    def next_layer(self) -> None:
        """The current layer is done: what it gave and hid now bind the ones below it."""
        self._above |= self._mine
        self._above_files = (self._above_files | self._mine_files) - {
            p for p in self._mine if p not in self._mine_files
        }
        self._hidden |= self._new_hidden
        self._opaque |= self._new_opaque
        self._mine, self._mine_files, self._new_hidden, self._new_opaque = set(), set(), set(), set()

    def keep(self, path: Path_, directory: bool) -> list[str] | None:
        """Where an entry of the current layer goes under the subtree, or None when it is not kept."""
        name = path[-1] if path else ""
        if name == OPAQUE:
            self._new_opaque.add(path[:-1])
            return None
        if name.startswith(WHITEOUT):
            self._new_hidden.add((*path[:-1], name[len(WHITEOUT) :]))
            return None
        for depth in range(len(path) + 1):
            above = path[:depth]
            if above in self._hidden or (depth < len(path) and (above in self._opaque or above in self._above_files)):
                return None
        if path in self._above:
            return None
        self._mine.update(path[:depth] for depth in range(1, len(path) + 1))  # a tar need not list the parents
        if directory:
            self._mine_files.discard(path)
        else:
            self._mine_files.add(path)
        if path[: len(self.prefix)] != self.prefix or (len(path) == len(self.prefix) and not directory):
            return None
        if len(path) > len(self.prefix):
            self.kept += 1
        return list(path[len(self.prefix) :])


class LayerView:
    """One image layer while it unpacks on its own: what it writes (the subtree) and what it records for the merge."""

    def __init__(self, subtree: str) -> None:
        self.prefix = _prefix(subtree)
        # Whiteouts, and what the layer puts at the subtree or on the way to it: they change what the
        # layers below give, so the merge replays them, in order, before the layer's files.
        self.marks: list[tuple[Path_, bool]] = []

    def place(self, parts: list[str], directory: bool) -> list[str] | None:
        """Where a member goes in the layer's own tree (under the subtree), or None when it is not written."""
        path = tuple(parts)
        name = path[-1] if path else ""
        if name.startswith(WHITEOUT):  # OPAQUE too
            self.marks.append((path, False))
            return None
        if len(path) > len(self.prefix) and path[: len(self.prefix)] == self.prefix:
            return list(path[len(self.prefix) :])
        if path == self.prefix[: len(path)]:
            self.marks.append((path, directory))
        return None

    def link_target(self, parts: list[str]) -> list[str] | None:
        """A hardlink's target in the layer's tree; None outside the subtree (refused: it was not written)."""
        if len(parts) > len(self.prefix) and tuple(parts[: len(self.prefix)]) == self.prefix:
            return parts[len(self.prefix) :]
        return None


class LayerTree(SafeTree):
    """A tar layer unpacked into a directory of its own, on the budget the image or artifact shares.

    Its symlinks are checked once merged, where they finally stand; nothing here follows them.
    """

    allow_empty = True  # a layer may hold nothing of the model: the merge checks the whole
    check_links = False

    def __init__(self, root: Path, budget: Budget, view: LayerView | None = None) -> None:
        super().__init__(root, strip_components=0, budget=budget)
        self._view = view

    def _parts(self, name: str, *, directory: bool = False, refused: str = "") -> list[str] | None:
        parts = super()._parts(name, directory=directory, refused=refused)
        if parts is None or self._view is None:
            return parts
        if refused:
            return self._view.link_target(parts)
        return self._view.place(parts, directory)

    def refuse(self, name: str, what: str) -> None:
        """A device or FIFO outside the subtree (a base image's /dev) is skipped, as everything there is."""
        if self._parts(name) is not None:
            super().refuse(name, what)


class MergedTree(SafeTree):
    """The model's tree, filled by moving the entries of the layers' own trees into it."""

    allow_empty = True  # an artifact's tar layers may hold nothing beside its raw ones; an image's view checks

    def __init__(self, root: Path) -> None:
        super().__init__(root, strip_components=0, budget=Budget(0, 0))  # what moves in was counted in its layer

    def move_in(self, source: Path, parts: list[str], directory: bool, clash: str) -> None:
        """Move ``source`` to ``parts`` (a directory is made, its entries follow); ``clash`` if something is there.

        Raises:
            ArchiveError: the path is taken (``clash``), or on its way is a symlink or a file.
        """
        name = "/".join(parts)
        try:
            parent = self._walk(parts, name, create=True)
            try:
                there = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is not None and not (directory and stat.S_ISDIR(there.st_mode)):
                raise ArchiveError(f"refused member {show(name)}: {clash}")
            if not directory:
                os.rename(source, parts[-1], dst_dir_fd=parent)
                return
            if there is None:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            made = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            mode = stat.S_IMODE(os.stat(source, follow_symlinks=False).st_mode)
        except OSError as exc:
            raise self._error(exc, name) from None
        self._dir_modes[tuple(parts)] = (mode, made.st_dev, made.st_ino)


def entries(root: Path) -> Iterator[tuple[Path, list[str], bool]]:
    """Each entry under ``root``, a directory before what it holds, links not followed: (path, parts, directory)."""
    stack: list[list[str]] = [[]]
    while stack:
        parts = stack.pop()
        try:
            with os.scandir(os.path.join(root, *parts)) as found:
                listed = sorted(found, key=lambda e: e.name)
        except OSError as exc:
            raise local_error(exc, "merging the unpacked layers") from None
        for entry in listed:
            directory = entry.is_dir(follow_symlinks=False)
            yield Path(entry.path), [*parts, entry.name], directory
            if directory:
                stack.append([*parts, entry.name])


def merge_packed(layers: list[Path], tree: MergedTree) -> None:
    """An artifact's layer trees side by side at the model's root; a file in two of them is refused.

    Raises:
        ArchiveError: two layers hold one path (other than a directory).
    """
    for root in layers:
        for source, parts, directory in entries(root):
            tree.move_in(source, parts, directory, "another layer of the artifact holds it too")
    tree.finish()


def merge_image(layers: list[tuple[Path, LayerView]], subtree: str, tree: MergedTree) -> int:
    """An image's layer trees (bottom first) as one filesystem's subtree; how many entries it kept.

    Raises:
        ArchiveError: nothing is under the subtree, or a symlink leads outside it.
    """
    view = ImageView(subtree)
    for root, marks in reversed(layers):  # the top layer has the last word: it goes first
        for path, directory in marks.marks:
            view.keep(path, directory)
        for source, parts, directory in entries(root):
            kept = view.keep((*view.prefix, *parts), directory)
            if kept:
                tree.move_in(source, kept, directory, "a layer above holds it")
        view.next_layer()
    if not view.kept:
        raise ArchiveError(f"the image holds nothing under {subtree} (--oci-path)")
    tree.finish()
    return view.kept
