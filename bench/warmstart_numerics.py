"""Warm-start numerics: train the study's warm start (or its first steps) and log every step's loss.

    python bench/warmstart_numerics.py --threads 1 --steps 60 --out /tmp/a.json      # first 60 steps
    python bench/warmstart_numerics.py --threads 2 --steps 60 --out /tmp/b.json
    python bench/warmstart_numerics.py --compare /tmp/a.json /tmp/b.json               # where they part

Also prints digests of the inputs that come before any arithmetic (tokenizer vocabulary, initial weights,
the first batches' token ids), so hash-seed or library differences show up before training does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch


def tensor_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="run the first STEPS steps of the warm start")
    parser.add_argument("--stage1", type=int, default=None,
                        help="stage-1 steps (default: the study's); a smaller value reaches the drill sooner")
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(Path(path).read_text()) for path in args.compare)
        for key in ("tokenizer", "init", "first_batch"):
            print(f"{key}: {a[key]} vs {b[key]} {'same' if a[key] == b[key] else 'DIFFERENT'}")
        first = next((i for i, (x, y) in enumerate(zip(a["losses"], b["losses"], strict=True)) if x != y), None)
        print(f"losses identical for the first {first if first is not None else len(a['losses'])} steps")
        for i in range(len(a["losses"])):
            x, y = a["losses"][i], b["losses"][i]
            if i < 5 or i % 10 == 9 or i == len(a["losses"]) - 1:
                print(f"step {i + 1:4d}  {x:.9f}  {y:.9f}  diff {x - y:+.3e}")
        return 0

    torch.set_num_threads(args.threads)
    from selfdistill.models import build_tiny_model, build_tiny_tokenizer
    from selfdistill.study.settings import WarmStartSettings
    from selfdistill.study.task import StudyTask
    from selfdistill.study.warmstart import train_warm_start

    base = WarmStartSettings()
    stage1 = args.stage1 if args.stage1 is not None else base.steps
    settings = dataclasses.replace(base, steps=stage1)
    tokenizer = build_tiny_tokenizer()
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    model = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                             seed=settings.seed)
    init = tensor_digest(model)
    task = StudyTask()
    sft = task.splits().sft_train
    first_batch = hashlib.sha256(json.dumps([p.problem for p in sft[:64]]).encode()).hexdigest()[:16]
    started = time.perf_counter()
    losses = train_warm_start(model, tokenizer, task, sft, settings, stop_after=args.steps)
    record = {"threads": args.threads, "torch": torch.__version__, "tokenizer": hashlib.sha256(vocab).hexdigest()[:16],
              "init": init, "first_batch": first_batch, "final_weights": tensor_digest(model),
              "seconds": round(time.perf_counter() - started, 1), "losses": losses}
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
