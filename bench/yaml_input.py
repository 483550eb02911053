"""Reading the YAML files users hand the harness (sweeps, ``bench.check`` baselines, the published
tables): ``yaml.safe_load`` semantics, bounded, and every failure a one-line ``ConfigError`` that
names the file (and the line where there is one) -- never a traceback, never a hang.

What is bounded and why: a sweep is a few hundred lines nesting a handful of levels, so anything
far beyond that is a mistake (a binary file, a generated blob, a "billion laughs" alias bomb) and
is refused before it is constructed: PyYAML's composer is recursive (thousands of nested brackets
end in ``RecursionError``), and aliases share objects that later deep copies and JSON dumps would
expand exponentially.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple

import yaml

from bench.config import ConfigError

MAX_BYTES = 4 * 2 ** 20  # the largest shipped sweep is ~6 KB
MAX_DEPTH = 40  # mappings/lists inside each other; sweeps use ~8
MAX_NODES = 200_000  # scalars + collections, counting every alias as the nodes it stands for


def read_yaml_file(path, what: str = "sweep file") -> Tuple[Any, str]:
    """The parsed document and its text; ``what`` names the file's role in error messages."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not p.is_file():
        raise ConfigError(f"{path}: {what} is not a regular file")
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {what} is {size / 2 ** 20:.1f} MiB; a {what} is a small text file "
                              f"(limit {MAX_BYTES // 2 ** 20} MiB)")
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {what} cannot be read: {exc.strerror or exc}") from None
    text = decode_utf8(data, str(path), what)
    return parse_yaml(text, str(path), what), text


def decode_utf8(data: bytes, origin: str, what: str = "file") -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{origin}:{line}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None


def parse_yaml(text: str, origin: str, what: str = "sweep file") -> Any:
    """Compose (with line marks), check the shape, then construct; every failure a ConfigError."""
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{origin}:{line}: {what} contains a NUL byte; it is not a text file")
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters: a YAMLError too
        node = loader.get_single_node()
        if node is None:
            return None
        _check_shape(node, origin, what)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f"{origin}:{mark.line + 1}" if mark and "\n" in text else origin  # one-line text: no line number
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{at}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: {what} nests too deeply to be read (more than {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp 2026-13-45, a 5000-digit int
        raise ConfigError(f"{origin}: {what} has a value YAML cannot construct: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_shape(root: yaml.Node, origin: str, what: str) -> None:
    """Depth and expanded size, walked iteratively (the document may be deeper than the stack)."""
    stack = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{origin}: {what} expands to more than {MAX_NODES} values (aliases included); "
                              f"a config file is far smaller")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{origin}:{node.start_mark.line + 1}: {what} nests more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
