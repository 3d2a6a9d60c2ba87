"""Build the study's warm start (one thread, an empty cache) and ship it into the package's assets.

    SELFDISTILL_CACHE=$(mktemp -d) python bench/ship_warm_start.py --task search   # train (10-15 min) and ship
    python bench/ship_warm_start.py --task chains --from ~/.cache/selfdistill/study-warmstart-<key>   # ship a built one

Writes src/selfdistill/study/assets/study-warmstart-<key>/ and its SHA-256 digests into
src/selfdistill/study/assets/warm_starts.json, then prints the digest of model.safetensors. Commit both;
tests/study/test_warmstart.py checks them against the code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfdistill.study.settings import TASKS, StudySettings
from selfdistill.study.warmstart import (
    file_digests,
    read_warm_start_record,
    ship_warm_start,
    warm_start_dir,
    warm_start_key,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(TASKS), default="search", help="the study task (default search)")
    parser.add_argument("--from", dest="source", help="a built warm-start folder of the task's default settings")
    args = parser.parse_args()
    study = StudySettings.for_task(args.task)
    task, settings = study.task, study.warm_start
    key = warm_start_key(task, settings)
    if args.source:
        folder = Path(args.source)
        if not folder.name.endswith(key):
            raise SystemExit(f"{folder} is not the warm start of the current settings (key {key})")
    else:
        folder = warm_start_dir(task, settings, rebuild=True,
                                on_step=lambda step, loss: print(f"step {step} loss {loss:.4f}", flush=True)
                                if step % 50 == 0 else None)
    record = read_warm_start_record(folder)
    if "first_losses" not in record:
        raise SystemExit(f"{folder}/warm_start.json has no first_losses: built by older code; rebuild it")
    target = ship_warm_start(folder, key)
    print(f"shipped {target}\nmodel.safetensors sha256 {file_digests(target)['model.safetensors']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
