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
import statistics

from _harness import WORKER_FLAG, markdown_table, peak_rss_mib, ratio, rss_mib, run_worker, serve_worker, time_runs

PATHS = ("naive", "chunked", "hidden", "recompute", "trl")


def path_loss(path: str, h, w, tokens, teacher_hidden, chunk_tokens: int):
    """The scalar loss of `path`: (sum of log-probs + entropies + reverse KL(S‖T)) / tokens, as a tensor."""
    from selfdistill.tokenstats import (
        DivergenceSpec,
        hidden_objective,
        hidden_token_stats,
        naive_token_stats,
        token_stats,
    )

    spec = DivergenceSpec(beta=1.0)  # reverse KL(S‖T)
    n = float(tokens.numel())

    def loss_of(stats):
        return (stats.logp.sum() + stats.entropy.sum() + stats.divergence.sum()) / n

    if path == "naive":
        return loss_of(naive_token_stats(h @ w.T, tokens, teacher_logits=teacher_hidden @ w.detach().T,
                                         divergence=spec))
    if path == "chunked":
        return loss_of(token_stats(h @ w.T, tokens, teacher_logits=teacher_hidden @ w.detach().T,
                                   divergence=spec, chunk_tokens=chunk_tokens))
    if path == "recompute":
        return loss_of(hidden_token_stats(h, w, tokens, teacher_hidden=teacher_hidden, divergence=spec,
                                          chunk_tokens=chunk_tokens))
    if path == "hidden":
        loss, _ = hidden_objective(h, w, tokens, lambda stats, rows_: loss_of(stats),
                                   teacher_hidden=teacher_hidden, divergence=spec, chunk_tokens=chunk_tokens)
        return loss
    if path == "trl":
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        logits = h @ w.T  # [B,T,V]
        t_logits = teacher_hidden @ w.detach().T
        logp = selective_log_softmax(logits, tokens)
        entropy = entropy_from_logits(logits)
        jsd = GKDTrainer.generalized_jsd_loss(logits, t_logits, beta=1.0, reduction="sum")
        return (logp.sum() + entropy.sum() + jsd) / n
    raise ValueError(path)


def run_one(spec: dict) -> dict:
    """The worker: one path's forward + backward, timed, and the resident memory it adds."""
    import torch

    torch.manual_seed(0)
    rows, dim, vocab = spec["rows"], spec["dim"], spec["vocab"]
    T = spec["tokens"] // rows
    hidden = torch.randn(rows, T, dim) / dim**0.5
    teacher_hidden = torch.randn(rows, T, dim) / dim**0.5
    weight = torch.randn(vocab, dim)
    tokens = torch.randint(0, vocab, (rows, T))

    # The inputs are leaves that exist before the step, as a model's hidden states and output weight do;
    # each step starts with no gradients, so "extra" counts the gradients the step itself allocates.
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)

    def step() -> float:
        h.grad = w.grad = None
        loss = path_loss(spec["path"], h, w, tokens, teacher_hidden, spec["chunk_tokens"])
        loss.backward()
        return loss.item()

    base = rss_mib()
    _, times, value = time_runs(step, spec["repeats"])  # the first run is a warm-up
    extra_gib = (peak_rss_mib() - base) / 1024
    return {"path": spec["path"], "seconds": statistics.median(times), "extra_gib": extra_gib, "loss": value}


def print_table(results: list[dict]) -> None:
    naive = next((r for r in results if r["path"] == "naive"), None)
    rows = [[r["path"], f"{r['seconds']:.2f}", f"{r['extra_gib']:.2f}",
             ratio(r["seconds"], naive["seconds"]) if naive else "-",
             ratio(r["extra_gib"], naive["extra_gib"]) if naive else "-"] for r in results]
    columns = ["path", "time fwd+bwd (s)", "peak extra memory (GiB)", "time / naive", "memory / naive"]
    print("\n".join(markdown_table(columns, "lrrrr", rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--rows", type=int, default=8, help="sequences; tokens per row = tokens / rows")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument(WORKER_FLAG, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(run_one, args.worker)
        return

    import torch

    print(f"N={args.tokens} tokens ({args.rows} rows), V={args.vocab}, d={args.dim}, chunk={args.chunk_tokens} "
          f"tokens, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} "
          "after 1 warm-up")
    results = []
    for path in args.paths.split(","):
        spec = {"path": path, "tokens": args.tokens, "vocab": args.vocab, "dim": args.dim, "rows": args.rows,
                "chunk_tokens": args.chunk_tokens, "repeats": args.repeats}
        result = run_worker(__file__, spec)
        if "error" in result:
            reason = result["error"]
            if path == "trl" and "No module named" in reason:
                reason = "trl is not installed (pip install trl beside the pinned torch)"
            print(f"{path:10s} failed: {reason}")
            continue
        results.append(result)
    print()
    print_table(results)
    ours = [r for r in results if r["path"] != "trl"]
    if len({round(r["loss"], 4) for r in ours}) > 1:
        print("WARNING: the paths disagree on the loss:", {r["path"]: r["loss"] for r in ours})


if __name__ == "__main__":
    main()
