"""Training checkpoints that are safe to open and survive a kill at any moment.

File format (version :data:`FORMAT_VERSION`): one ASCII header line
``smoothchain-checkpoint 1 sha256=<64 hex digits> bytes=<n>`` followed by the ``n`` bytes of a
``torch.save`` of a dict.  Reading checks the header, the length (a truncated file) and the
checksum (damaged bytes), then unpickles with ``torch.load(weights_only=True)``: only tensors,
numbers, strings, lists and dicts come back, and a pickle that would construct any other object
(and so could run code) is refused -- whatever its checksum, which its author can compute too.

Writing keeps the previous good checkpoint until the new one is complete: the new one is written
to ``PATH.tmp`` and synced, the current ``PATH`` becomes ``PATH.prev``, and ``PATH.tmp`` becomes
``PATH``.  A kill at any point leaves a readable ``PATH`` or ``PATH.prev``; :func:`load_checkpoint`
falls back to the previous one, with a warning naming both files, when the latest is missing or
damaged.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "previous_path", "checkpoint_files"]

FORMAT_VERSION = 1
MAGIC = "smoothchain-checkpoint"
#: the keys every training checkpoint holds (smoothchain.train)
REQUIRED = ("config", "model", "optimizer", "rng", "step", "metrics", "counts")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, damaged, foreign or unsafe."""


def previous_path(path: str | os.PathLike) -> Path:
    """``PATH.prev``: the checkpoint before the latest, kept until the next one is complete."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def checkpoint_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(``PATH``, ``PATH.prev``, ``PATH.tmp``): every file a checkpointing run writes."""
    path = Path(path)
    return path, previous_path(path), path.with_name(path.name + ".tmp")


def _write(tmp: Path, header: bytes, data: bytes) -> None:
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) to ``path`` in the format of
    the module docstring; the previous ``path`` becomes ``path.prev`` once the new one is on disk."""
    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = f"{MAGIC} {FORMAT_VERSION} sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}\n".encode()
    current, prev, tmp = checkpoint_files(path)
    _write(tmp, header, data)
    if current.exists():
        os.replace(current, prev)
    os.replace(tmp, current)
    return current


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The payload of one checkpoint file; :class:`CheckpointError` naming the file and what is
    wrong with it (missing, not a smoothchain checkpoint, another format version, truncated,
    damaged, holding objects other than tensors/numbers/strings, lacking a field)."""
    import torch

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    end = raw.find(b"\n", 0, 256)
    if end < 0 and raw.startswith(MAGIC.encode()):
        raise CheckpointError(f"{path} is truncated (its header is incomplete)")
    fields = raw[:end].decode("ascii", "replace").split() if end > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC or not fields[2].startswith("sha256=") \
            or not fields[3].startswith("bytes="):
        raise CheckpointError(f"{path} is not a smoothchain checkpoint (no format header)")
    if fields[1] != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format {fields[1]}; this smoothchain reads format "
                              f"{FORMAT_VERSION}")
    data = raw[end + 1:]
    try:
        expected = int(fields[3][len("bytes="):])
    except ValueError:
        raise CheckpointError(f"{path} has a malformed header") from None
    if len(data) != expected:
        raise CheckpointError(f"{path} is truncated ({len(data)} of {expected} bytes)")
    if hashlib.sha256(data).hexdigest() != fields[2][len("sha256="):]:
        raise CheckpointError(f"{path} is damaged (its checksum does not match)")
    try:
        payload: Any = torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors, numbers and strings (unpickling them "
                              f"could run code): refused; open it with torch.load(weights_only=False) only if "
                              f"you trust its source") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on corrupt archives
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} does not hold a training checkpoint (a {type(payload).__name__})")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path} does not hold a training checkpoint (no {', '.join(missing)})")
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, Path, str | None]:
    """(payload, the file it came from, a warning or None): ``path``, or ``path.prev`` when
    ``path`` is missing or unusable (the warning names both).  :class:`CheckpointError` when
    neither can be used."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return read_checkpoint(path), path, None
    except CheckpointError as latest:
        if not prev.exists():
            raise
        try:
            payload = read_checkpoint(prev)
        except CheckpointError as older:
            raise CheckpointError(f"{latest}; the previous one is unusable too: {older}") from None
        return payload, prev, f"{latest}; resuming from the previous checkpoint {prev} (step {payload['step']})"
