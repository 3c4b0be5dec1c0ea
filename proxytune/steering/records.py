"""Which models a blend was tuned with: the `models` record of blend.json, and comparing it with the models given; the
prompt template a run uses, from the flag or as the small tuned model, the blend file or the data record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.hub import hub_revision
from proxytune.steering.blend import read_blend_file
from proxytune.task.prompts import PromptTemplate, choose_template, read_template, template_from_record


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


def blend_template(path: str | Path) -> PromptTemplate | None:
    """The prompt template a blend file records (`prompt_template`, written by --tune), None for a file without one."""
    record = read_blend_file(path).get("prompt_template")
    return None if record is None else template_from_record(record, f"in blend file {path}")


def run_template(given: str | None, small_tuned_model: str | None, blend_file: str | None,
                 data_path: str | None = None) -> PromptTemplate:
    """The prompt template of a steer.py or evaluation.py run: --prompt_template when given, else the one recorded by
    the small tuned model's directory (fine_tune.py's final/), the blend file or the processed data, in that order,
    else meta_review; a recorded template that differs from the one used is warned about (choose_template)."""
    return choose_template(given, [
        (f"the small tuned model {small_tuned_model}", read_template(small_tuned_model)),
        (f"the blend {blend_file}", blend_template(blend_file) if blend_file else None),
        (f"the data {data_path}", read_template(data_path) if data_path and Path(data_path).is_dir() else None)])
