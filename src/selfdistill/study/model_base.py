"""A given model as the study's base, instead of the tiny warm start (a study on a benchmark task).

`prepare_model_base` resolves `StudySettings.model` to a local Hugging Face folder (SmolLM2 is converted into
the cache on first use; nothing comes from the hub), names it by an identity that changes when its weights do
(the folder name and a hash of its config and weight files' names and sizes: cheap on a multi-GB model, unlike
a content hash), and returns the record study.json keeps (with the validation slice the runs never train on).
`base_model_section` is the report's section about that base (in place of the warm start's).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from selfdistill.study.settings import StudySettings

VALIDATION_FILE = "validation.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_identity(folder: Path) -> str:
    """`<folder name>-<12 hex digits>`: a hash of config.json's text and of every weight file's name and size."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


def parameter_count(folder: Path) -> int | None:
    """Parameters of the model's safetensors files, read from their headers (no weights loaded); None without any."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = weights.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def prepare_model_base(settings: StudySettings) -> tuple[Path, dict[str, Any], str]:
    """(the model's folder, its record for study.json, its identity for the run keys). The record names the file
    the runner writes the validation slice to (`validation_file`, relative to the study folder)."""
    from selfdistill.models import model_folder

    if settings.model is None:
        raise ValueError("prepare_model_base needs settings.model")
    folder = model_folder(settings.model)
    identity = model_identity(folder)
    splits = settings.task.splits()
    validation = list(splits.validation)
    record = {
        "model": settings.model, "folder": str(folder), "identity": identity, "parameters": parameter_count(folder),
        "rl_problems": len(splits.rl_train), "held_out_problems": len(splits.held_out),
        "evaluated_problems": len(settings.evaluation_sets()[0]), "validation_problems": len(validation),
        "validation_file": f"problems/{VALIDATION_FILE}", "validation_ids": [p.id for p in validation],
    }
    return folder, record, identity


def base_model_section(study: dict[str, Any], prompt_table: str) -> str:
    """The report's section on the base model (`report._warm_start_section`'s counterpart when there is no warm
    start): what it is, the problems, its numbers under every prompt (`prompt_table`, built by the report) and the
    premise check. `study`: the study.json record."""
    base, settings = study["base_model"], study["settings"]
    n = settings["eval_samples"]
    parameters = f", {base['parameters']:,} parameters" if base.get("parameters") else ""
    holds = study.get("premise_holds", True)
    premise_note = [] if holds or settings.get("premise_stops", True) else [
        "", "**The premise fails and the methods ran anyway** (`premise_stops` off: a smoke test, e.g. `--quick`). "
            "No result below says anything about the methods."]
    return "\n".join([
        "## Base model",
        "",
        f"`{base['model']}` (folder `{base['folder']}`, identity `{base['identity']}`{parameters}), the base of every "
        "run and the frozen teacher; no warm start. Problems: "
        f"{base['rl_problems']:,} RL problems (the train split less a validation slice of "
        f"{base['validation_problems']} problems that no run trains on, listed in `{base['validation_file']}`), "
        f"{base['evaluated_problems']} of the {base['held_out_problems']:,} test problems held out.",
        "",
        f"The base model on the held-out problems (n = {n} samples each, temperature {settings['temperature']}) "
        "under each prompt. H is the mean next-token entropy (nats) along the reference solutions under teacher "
        "forcing, by token kind (number: tokens of a number; text: the rest of the solution; forced: the end of "
        "sequence).",
        "",
        prompt_table,
        "",
        f"Premise (each teacher view the methods use must beat the student prompt by {settings['premise_margin']:g} "
        f"Avg@{n}):",
        "",
        *[f"- {line}" for line in study.get("premise", [])],
        *premise_note,
    ])
