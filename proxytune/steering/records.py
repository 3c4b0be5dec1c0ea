"""Which models a blend was tuned with: the `models` record of blend.json, and comparing it with the models given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.hub import hub_revision
from proxytune.steering.blend import read_blend_file


def model_record(name_or_path: str, quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """How blend.json records a model: the name as given, the absolute path of a local directory (so the record
    works from another directory), the Hub commit of a Hub model (None where unknown), and how its weights were
    loaded (`quantization`: loaded_quantization's record, None = unquantised)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return {"name_or_path": name_or_path, "path": str(local.resolve()), "revision": None,
                "quantization": quantization}
    return {"name_or_path": name_or_path, "path": None, "revision": hub_revision(name_or_path),
            "quantization": quantization}


def blend_models(path: str | Path) -> dict[str, dict]:
    """The models a blend file records (role -> model_record), {} for a file without a record ({"alpha": 1})."""
    models = read_blend_file(path).get("models") or {}
    if not isinstance(models, dict) or not all(isinstance(e, dict) and e.get("name_or_path") for e in models.values()):
        raise UsageError(f"blend file {path}: 'models' must map roles to records with a 'name_or_path'")
    for role, entry in models.items():
        quantization = entry.get("quantization")
        if quantization is not None and not (isinstance(quantization, dict) and quantization.get("bits") in (4, 8)):
            raise UsageError(f"blend file {path}: models.{role}.quantization is {quantization!r}; it must be null "
                             "(unquantised) or a record with 'bits' 4 or 8, as steer.py --tune writes")
    return models


def recorded_model(entry: dict) -> str:
    """What to load for a blend_models record: the name as given, or the recorded absolute path when the given
    (relative) path does not exist from the current directory."""
    given, local = entry["name_or_path"], entry.get("path")
    if local and not Path(given).expanduser().exists() and Path(local).exists():
        return local
    return given


def same_model(a: str, b: str) -> bool:
    """Two model names mean the same model: equal as Hub ids, or the same directory on disk."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
