"""Which files of the folders given to ``bench.score`` belong together (the pairing rule).

* An image file is a regular file whose extension, in any letter case, is one of
  ``IMAGE_EXTENSIONS``; other files, and anything under a name starting with ``.``, are ignored
  (and counted).
* Its key is its path relative to the folder, without the extension, with ``/`` separators:
  ``sub/0001.png`` has the key ``sub/0001``. Keys are case-sensitive.
* A key occurs at most once per folder (``a.png`` next to ``a.jpg`` is an error).
* Every folder must hold exactly the keys of the first ``--fake`` folder; otherwise the error gives
  the counts and the first few unmatched keys on each side.
* Files are scored in the sorted order of their keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SHOWN = 5  # unmatched keys quoted in an error


class ScoreInputError(ValueError):
    """A problem with what the user gave ``bench.score`` (folders, files, options): exit code 2."""


@dataclass(frozen=True)
class Folder:
    """One folder's image files by key."""

    option: str  # the command-line option that named it, for messages (e.g. "--real")
    root: Path
    files: Dict[str, Path]  # key -> file
    ignored: int  # files that are not images (or hidden)


def scan_folder(option: str, root: Path) -> Folder:
    root = Path(root)
    if not root.is_dir():
        raise ScoreInputError(f"{option} {root}: not a directory")
    files: Dict[str, Path] = {}
    ignored = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            ignored += path.is_file()
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
            continue
        key = rel.with_suffix("").as_posix()
        if key in files:
            raise ScoreInputError(f"{option} {root}: two files have the key {key!r} ({files[key].name} and "
                                  f"{path.name}); keep one of them")
        files[key] = path
    if not files:
        raise ScoreInputError(f"{option} {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}, searched "
                              f"recursively; {ignored} other files)")
    return Folder(option, root, files, ignored)


def _quote(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (", ..." if len(keys) > SHOWN else "")


def check_paired(reference: Folder, other: Folder) -> None:
    """``other`` must hold exactly ``reference``'s keys."""
    missing = sorted(set(reference.files) - set(other.files))
    extra = sorted(set(other.files) - set(reference.files))
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {len(reference.files)} files of {reference.option} have no file of "
                     f"the same name in {other.option} ({_quote(missing)})")
    if extra:
        parts.append(f"{len(extra)} of the {len(other.files)} files of {other.option} have no file of the same "
                     f"name in {reference.option} ({_quote(extra)})")
    raise ScoreInputError("unpaired files: " + "; ".join(parts) + ". Files are paired by their path relative to "
                          "the folder, without the extension (see --help)")


def pair_folders(folders: Sequence[Folder]) -> List[str]:
    """The keys every folder shares (the first folder is the reference), sorted."""
    for other in folders[1:]:
        check_paired(folders[0], other)
    return sorted(folders[0].files)
