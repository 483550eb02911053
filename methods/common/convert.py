"""What every converter of official checkpoints shares: reading the release files (including the
known-broken ones), reading ``opt.txt``, and checking a state dict against what a network expects,
with one error that lists every missing, unexpected and mis-shaped key.

Each method's ``methods/<name>/convert.py`` holds its own key mapping and its ``RELEASES`` (the
official README test commands, for releases that ship no ``opt.txt``); ``python -m bench.convert``
is the command line.
"""
from __future__ import annotations

import ast
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

CHECKPOINT_FORMAT = "exbench-checkpoint/1"


class ConversionError(ValueError):
    """An official checkpoint that does not fit: the message lists every offending key."""


@dataclass
class Release:
    """One released official checkpoint configuration."""

    name: str  # --release name, e.g. "ade20k"
    files: Dict[str, str]  # official network -> file in the release folder, e.g. {"netG": "latest_net_G.pth"}
    command: str  # the README test command, verbatim
    options: Dict[str, Any]  # the official options that command gives (what opt.txt would record)
    dataset: str  # our dataset the release evaluates on
    variant: Optional[str] = None
    optional_files: Tuple[str, ...] = ()  # networks the release may lack (e.g. netD)
    note: str = ""


@dataclass
class Converted:
    """A converter's result: our state dict (keys of our method's ``state_dict``), the resolved
    options of our method, what our method is built with besides them, and what was left out."""

    state_dict: Dict[str, torch.Tensor]
    options: Dict[str, Any]
    context: Dict[str, Any]  # resolution, cond_channels, num_classes, dataset, variant
    dropped: Dict[str, str] = field(default_factory=dict)  # official key (or prefix*) -> why it is not used


def _shape(t) -> Tuple[int, ...]:
    return tuple(int(s) for s in (t.shape if hasattr(t, "shape") else t))


def check_state_dict(expected: Mapping[str, Any], got: Mapping[str, Any], what: str,
                     allow_missing: Iterable[str] = ()) -> None:
    """Raise one ``ConversionError`` listing every key of ``got`` that ``expected`` lacks, every key
    of ``expected`` missing from ``got`` (except prefixes in ``allow_missing``), and every shape that
    differs. Values may be tensors or shapes."""
    allow = tuple(allow_missing)
    missing = [k for k in expected if k not in got and not k.startswith(allow)]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k}: {_shape(got[k])} vs expected {_shape(expected[k])}"
              for k in got if k in expected and _shape(got[k]) != _shape(expected[k])]
    if missing or unexpected or shapes:
        raise ConversionError(format_key_problems(what, missing, unexpected, shapes))


def format_key_problems(what: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str],
                        limit: int = 40) -> str:
    lines = [f"{what}: {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped keys"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        for item in list(items)[:limit]:
            lines.append(f"  {title}: {item}")
        if len(items) > limit:
            lines.append(f"  {title}: ... and {len(items) - limit} more")
    return "\n".join(lines)


def load_official_file(path) -> Dict[str, torch.Tensor]:
    """An official ``.pth``/``.ckpt`` as a flat state dict, read with ``weights_only=True``.

    Handles the known-broken CoCosNet v2 release: its ``latest_net_Corr.pth`` is a torch zip with
    extra records outside the archive folder (``latest_net_D.pth``/``latest_net_G.pth``), which
    ``torch.load`` rejects ("file in archive is not in a subdirectory"); the records of the
    archive's own folder are read instead (what deleting the others with 7-zip does, issues
    #3/#16/#22/#26). Checkpoints that wrap the weights (``state_dict``, Lightning's ``state_dict``,
    MIDMs' ``{'epoch', 'state_dict', ...}``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: official checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        if "not in a subdirectory" not in str(exc):
            raise ConversionError(f"{path}: torch.load failed: {exc}") from None
        obj = torch.load(io.BytesIO(_repaired_zip(path)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors name the file
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict (key -> tensor), got {type(obj).__name__}")
    return dict(obj)


def _repaired_zip(path: Path) -> bytes:
    """The records of the zip's main archive folder (the one holding ``data.pkl``), re-zipped."""
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        roots = [n.split("/", 1)[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise ConversionError(f"{path}: a broken torch zip with {len(roots)} archive folders; cannot repair")
        keep = [n for n in names if n.startswith(roots[0] + "/")]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as dst:
            for n in keep:
                dst.writestr(n, src.read(n))
    return buf.getvalue()


def _value(text: str) -> Any:
    text = text.strip()
    for parse in (ast.literal_eval,):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            pass
    if text in ("inf", "-inf"):
        return float(text)
    return text


def parse_opt_txt(text: str) -> Dict[str, Any]:
    """The options an official ``opt.txt`` records (``name: value [default: ...]`` lines between the
    ``Options`` and ``End`` rulers; SPADE/CoCosNet's ``BaseOptions.print_options`` format)."""
    out: Dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("---") or ":" not in line:
            continue
        key, rest = line.split(":", 1)
        rest = rest.split("\t[default:", 1)[0].split("[default:", 1)[0]
        out[key.strip()] = _value(rest)
    return out


def meta_state_dict(manifest: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Weight-less tensors (meta device) with a manifest's shapes and dtypes: a converter can be
    checked for completeness at full width without any weights."""
    out = {}
    for key, (shape, dtype) in manifest.items():
        out[key] = torch.empty(tuple(shape), dtype=getattr(torch, str(dtype).replace("torch.", "")), device="meta")
    return out


def build_converted(method_cls, converted: "Converted", training: bool = False, device="meta", **ctx_overrides):
    """Our method built from a converter's resolved options and context -- on the meta device by
    default, so a full-width network costs no memory (checking a converter against a manifest).
    ``training=True`` also builds the training-only networks (discriminators); loss backbones are
    then random-init (``allow_untrained``), which on the meta device allocates nothing."""
    from methods.base import BackboneSettings, MethodContext
    from datasets.base import DataInfo

    c = converted.context
    data = DataInfo(name=c.get("dataset", "official"), variant=c.get("variant") or "default", split="test", size=0,
                    resolution=int(c["resolution"]), cond_channels=int(c["cond_channels"]),
                    num_classes=c.get("num_classes"))
    options = method_cls.Options(**converted.options) if method_cls.Options else None
    ctx = MethodContext(data=data, resolution=int(c["resolution"]), width=1.0, device=torch.device(device),
                        backbones=BackboneSettings(allow_untrained=True, download=False), training=training,
                        total_steps=1 if training else 0, **ctx_overrides)
    with torch.device(device):
        return method_cls(options, ctx)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def rename(state: Mapping[str, torch.Tensor], rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply ordered (old substring, new substring) replacements to every key."""
    out = {}
    for k, v in state.items():
        for old, new in rules:
            k = k.replace(old, new)
        out[k] = v
    return out


__all__ = ["CHECKPOINT_FORMAT", "ConversionError", "Converted", "Release", "add_prefix", "build_converted", "check_state_dict",
           "format_key_problems", "load_official_file", "meta_state_dict", "parse_opt_txt", "rename", "strip_prefix"]
