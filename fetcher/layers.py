"""An image's layers as the one filesystem a container would see, of which one subtree is kept.

A model shipped inside an ordinary image (a KServe modelcar: the weights under
``/models``) is spread over tar layers that each change the ones below:
a later file replaces an earlier one, ``.wh.NAME`` deletes ``NAME`` from the
layers below, and ``.wh..wh..opq`` hides everything the layers below put in its
directory. The layers are read from the top (last) down, so that each path is
written once, by the layer that has the last word on it, and a path another
layer hides or replaces is never written at all; so is everything outside the
subtree asked for (``--oci-path``), whose contents land at dest's root.
Every member still goes through ``SafeTree``'s checks first.
"""

from __future__ import annotations

from pathlib import Path

from fetcher.errors import ArchiveError
from fetcher.unpack import SafeTree, show

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

Path_ = tuple[str, ...]


class ImageView:
    """What the layers above the current one decided; shared by the ``ImageLayer`` of each layer."""

    def __init__(self, subtree: str) -> None:
        self.prefix: Path_ = tuple(p for p in subtree.split("/") if p and p != ".")
        self.kept = 0  # members written below the subtree
        self._above: set[Path_] = set()  # decided by a layer above: a lower one never writes them
        self._above_files: set[Path_] = set()  # of those, what is not a directory: nothing lower goes beneath it
        self._hidden: set[Path_] = set()  # whited out by a layer above
        self._opaque: set[Path_] = set()  # directories whose lower contents a layer above hid
        self._mine: set[Path_] = set()  # this layer's paths (their parents too), where a later copy replaces
        self._mine_files: set[Path_] = set()  # this layer's files: the only ones its hardlinks may name
        self._new_hidden: set[Path_] = set()  # this layer's whiteouts: they apply to the layers below only
        self._new_opaque: set[Path_] = set()

    def next_layer(self) -> None:
        """The current layer is done: what it wrote and hid now bind the ones below it."""
        self._above |= self._mine
        self._above_files = (self._above_files | self._mine_files) - {
            p for p in self._mine if p not in self._mine_files
        }
        self._hidden |= self._new_hidden
        self._opaque |= self._new_opaque
        self._mine, self._mine_files, self._new_hidden, self._new_opaque = set(), set(), set(), set()

    def keep(self, parts: list[str], directory: bool) -> list[str] | None:
        """Where a member of the current layer goes under the subtree, or None when it is not written."""
        name = parts[-1] if parts else ""
        if name == OPAQUE:
            self._new_opaque.add(tuple(parts[:-1]))
            return None
        if name.startswith(WHITEOUT):
            self._new_hidden.add((*parts[:-1], name[len(WHITEOUT) :]))
            return None
        path = tuple(parts)
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

    def link_target(self, parts: list[str], name: str) -> list[str] | None:
        """A hardlink's target: a file this same layer wrote under the subtree (None outside it: refused).

        Raises:
            ArchiveError: the target is another layer's (a layer above replaced or deleted it, or it is
                below): linking to the tree built so far would publish other bytes than the image holds.
        """
        if tuple(parts) not in self._mine_files:
            raise ArchiveError(f"refused member {show(name)}: a hardlink to a file of another layer (not supported)")
        if tuple(parts[: len(self.prefix)]) != self.prefix:
            return None
        return parts[len(self.prefix) :]


class ImageLayer(SafeTree):
    """One layer's members, kept or skipped by the view, then checked and written as any archive's."""

    allow_empty = True  # a layer may add nothing under the subtree: the view checks the whole image

    def __init__(self, root: Path, view: ImageView, *, max_size: int, max_members: int) -> None:
        super().__init__(root, strip_components=0, max_size=max_size, max_members=max_members)
        self._view = view

    def _parts(self, name: str, *, directory: bool = False, refused: str = "") -> list[str] | None:
        parts = super()._parts(name, directory=directory, refused=refused)
        if parts is None:
            return None
        if refused:
            return self._view.link_target(parts, name)
        return self._view.keep(parts, directory)

    def refuse(self, name: str, what: str) -> None:
        """A device or FIFO outside the subtree (a base image's /dev) is skipped, as everything there is."""
        if self._parts(name) is not None:
            super().refuse(name, what)


class PackedLayer(SafeTree):
    """A model artifact's tar layer (ModelPack, an ORAS directory), unpacked at the root beside the others.

    Layers of an artifact are parts of one model, not changes to each other: a path that an
    earlier layer wrote is refused (exit 5), as two layers naming one file are.
    """

    allow_empty = True  # one layer may hold nothing: the model is all of them

    def __init__(self, root: Path, written: set[Path_], *, max_size: int, max_members: int) -> None:
        super().__init__(root, strip_components=0, max_size=max_size, max_members=max_members)
        self._earlier = frozenset(written)
        self._written = written

    def _parts(self, name: str, *, directory: bool = False, refused: str = "") -> list[str] | None:
        parts = super()._parts(name, directory=directory, refused=refused)
        if parts is None or refused or directory:
            return parts
        if tuple(parts) in self._earlier:
            raise ArchiveError(f"refused member {show(name)}: another layer of the artifact holds it too")
        self._written.add(tuple(parts))
        return parts
