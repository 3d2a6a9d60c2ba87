"""Time and peak memory of the token-statistics paths: log-prob + entropy + reverse KL, forward and backward.

    python bench/tokenstats.py                      # N=4096 tokens, V=151936, d=896 (Qwen2.5-0.5B's head)
    python bench/tokenstats.py --tokens 1024 --repeats 2

Each path runs in its own process so that its peak resident memory is its own; "extra" is the peak
minus the resident memory once the inputs exist. Paths:
  naive       full float32 logits, log_softmax over [N,V] at once (the reference)
  chunked     full logits, statistics in chunks with the softmax recomputed in backward
  hidden      hidden states + output weight, fused: each block's gradient taken during the forward pass
  recompute   hidden states + output weight, chunked, each chunk's logits recomputed in backward
  trl         TRL's selective_log_softmax + entropy_from_logits + GKD generalized_jsd_loss on full logits
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("naive", "chunked", "hidden", "recompute", "trl")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one(path: str, n_tokens: int, vocab: int, dim: int, rows: int, chunk_tokens: int, repeats: int) -> dict:
    import torch

    from selfdistill.tokenstats import (
        DivergenceSpec,
        hidden_objective,
        hidden_token_stats,
        naive_token_stats,
        token_stats,
    )

    torch.manual_seed(0)
    T = n_tokens // rows
    hidden = torch.randn(rows, T, dim) / dim**0.5
    teacher_hidden = torch.randn(rows, T, dim) / dim**0.5
    weight = torch.randn(vocab, dim)
    tokens = torch.randint(0, vocab, (rows, T))
    spec = DivergenceSpec(beta=1.0)  # reverse KL(S‖T)
    n = float(rows * T)

    def loss_of(stats) -> torch.Tensor:
        return (stats.logp.sum() + stats.entropy.sum() + stats.divergence.sum()) / n

    # The inputs are leaves that exist before the step, as a model's hidden states and output weight do;
    # each step starts with no gradients, so "extra" counts the gradients the step itself allocates.
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)

    def step() -> float:
        h.grad = w.grad = None
        if path == "naive":
            loss = loss_of(naive_token_stats(h @ w.T, tokens, teacher_logits=teacher_hidden @ w.detach().T,
                                             divergence=spec))
        elif path == "chunked":
            loss = loss_of(token_stats(h @ w.T, tokens, teacher_logits=teacher_hidden @ w.detach().T,
                                       divergence=spec, chunk_tokens=chunk_tokens))
        elif path == "recompute":
            loss = loss_of(hidden_token_stats(h, w, tokens, teacher_hidden=teacher_hidden, divergence=spec,
                                              chunk_tokens=chunk_tokens))
        elif path == "hidden":
            loss, _ = hidden_objective(h, w, tokens, lambda stats, rows_: loss_of(stats),
                                       teacher_hidden=teacher_hidden, divergence=spec, chunk_tokens=chunk_tokens)
        elif path == "trl":
            import os

            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            from trl.experimental.gkd import GKDTrainer
            from trl.trainer.utils import entropy_from_logits, selective_log_softmax

            logits = h @ w.T  # [B,T,V]
            t_logits = teacher_hidden @ w.detach().T
            logp = selective_log_softmax(logits, tokens)
            entropy = entropy_from_logits(logits)
            jsd = GKDTrainer.generalized_jsd_loss(logits, t_logits, beta=1.0, reduction="sum")
            loss = (logp.sum() + entropy.sum() + jsd) / n
        else:
            raise ValueError(path)
        loss.backward()
        return loss.item()

    base = rss_kib()
    times, value = [], None
    for i in range(repeats + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        value = step()
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "seconds": statistics.median(times), "extra_gib": (peak - base) / 2**20, "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--rows", type=int, default=8, help="sequences; tokens per row = tokens / rows")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.child, args.tokens, args.vocab, args.dim, args.rows, args.chunk_tokens, args.repeats)
        print(json.dumps(result))
        return

    import torch

    print(f"N={args.tokens} tokens ({args.rows} rows), V={args.vocab}, d={args.dim}, chunk={args.chunk_tokens} "
          f"tokens, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} "
          "after 1 warm-up")
    results = []
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, "--child", path] + [
            f"--{k}={v}" for k, v in (("tokens", args.tokens), ("vocab", args.vocab), ("dim", args.dim),
                                      ("rows", args.rows), ("chunk-tokens", args.chunk_tokens),
                                      ("repeats", args.repeats))
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            if path == "trl" and "No module named" in reason:
                reason = "trl is not installed (pip install trl beside the pinned torch)"
            print(f"{path:10s} failed: {reason}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    naive = next((r for r in results if r["path"] == "naive"), None)
    print()
    print("| path | time fwd+bwd (s) | peak extra memory (GiB) | time / naive | memory / naive |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        t_ratio = f"{r['seconds'] / naive['seconds']:.2f}x" if naive else "-"
        m_ratio = f"{r['extra_gib'] / naive['extra_gib']:.2f}x" if naive else "-"
        print(f"| {r['path']} | {r['seconds']:.2f} | {r['extra_gib']:.2f} | {t_ratio} | {m_ratio} |")
    ours = [r for r in results if r["path"] != "trl"]
    if len({round(r["loss"], 4) for r in ours}) > 1:
        print("WARNING: the paths disagree on the loss:", {r["path"]: r["loss"] for r in ours})


if __name__ == "__main__":
    main()
