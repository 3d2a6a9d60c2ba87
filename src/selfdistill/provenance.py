"""What made a run: the package and its git commit, Python, the libraries, threads, BLAS and hardware.

`collect()` returns it as a dict, `summary_line(record)` as one line for reports, and
`record_environment(folder)` writes it to `<folder>/environment.json`. Every run folder gets one
(train, eval, demo, study). A folder that is written again (a resumed run) keeps the earlier records
under "previous", so a run continued on another machine or version says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from selfdistill.atomic import write_json_atomic

ENVIRONMENT_FILE = "environment.json"
# The libraries whose versions change results; the first five are printed in the summary line.
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "huggingface_hub", "math-verify", "numpy",
            "tokenizers", "safetensors")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(folder: Path | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout that holds the imported package (None when it is not in one,
    e.g. installed from a wheel). "dirty": a tracked file differs from the commit (untracked files do not
    count)."""
    folder = Path(__file__).resolve().parents[2] if folder is None else folder
    if not (folder / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _blas() -> str | None:
    """The BLAS torch was built with, from its build configuration (e.g. "mkl", "open")."""
    import torch

    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return match.group(1) if match else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware() -> dict[str, Any]:
    import torch

    hardware: dict[str, Any] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(count)]
        hardware["cuda"] = torch.version.cuda
    return hardware


def collect() -> dict[str, Any]:
    """The environment of this process, as a JSON-ready dict."""
    import torch

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "selfdistill": _version("selfdistill"),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "blas": _blas(),
        "hardware": _hardware(),
        "command": sys.argv,
    }


def summary_line(record: dict[str, Any]) -> str:
    """One line: `selfdistill 0.1.0 @ 1a2b3c4 (dirty) | Python 3.11.7 | torch 2.13.0+cpu, transformers ... |
    2 threads, BLAS mkl | CPU: <name>` (or `GPU: <name>`)."""
    git = record.get("git")
    where = "not a git checkout" if git is None else git["commit"][:10] + (" (dirty)" if git["dirty"] else "")
    packages = record.get("packages", {})
    libraries = ", ".join(f"{name} {packages.get(name) or '-'}" for name in PACKAGES[:5])
    hardware = record.get("hardware", {})
    device = f"GPU: {', '.join(hardware['gpus'])}" if hardware.get("gpus") else f"CPU: {hardware.get('cpu')}"
    return (f"selfdistill {record.get('selfdistill')} @ {where} | Python {record.get('python')} | {libraries} | "
            f"{record.get('torch_threads')} threads, BLAS {record.get('blas')} | {device}")


def record_environment(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Write `<folder>/environment.json` (atomically) and return the record. An earlier record in the folder
    is kept under "previous"."""
    path = Path(folder) / ENVIRONMENT_FILE
    record = collect()
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            earlier = None
        if isinstance(earlier, dict):
            record["previous"] = [*earlier.pop("previous", []), earlier]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def read_environment(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(folder) / ENVIRONMENT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
