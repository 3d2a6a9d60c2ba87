"""Our training step against TRL's, side by side: seconds per optimizer step and peak memory.

    python bench/step_vs_trl.py                        # both sizes, all three pairs
    python bench/step_vs_trl.py --quick                # a smoke check in about a minute
    python bench/step_vs_trl.py --pairs opsd-full --sizes qwen-vocab --steps 8 --profile
    python bench/step_vs_trl.py --sizes tiny --rounds 3 --steps 10   # steadier figures on a noisy machine
    python bench/step_vs_trl.py --pairs dasd-route,opsd-route --sizes tiny,long --steps 2   # the TRL route

Pairs (ours vs TRL), each with the frozen initial model as teacher (TRL: teacher_model_kind="base"):
  opsd-full   objective.name=opsd   (full-vocabulary JSD, beta 0.5)  vs  SDFTTrainer distillation_mode=full_logits
  opsd-topk   opsd with objective.divergence_top_k=k                  vs  SDFTTrainer distillation_mode=topk_logits
  dasd-grpo   objective.name=dasd                                     vs  GRPOTrainer (the nearest TRL has), with
              beta=--grpo-beta so that, like our frozen teacher, a frozen reference model scores every rollout
  dasd-route  the TRL route (selfdistill.integrations.trl.SelfDistillTrainer, objective dasd, frozen teacher)
              vs  TRL's own GRPOTrainer at the same settings with beta=0: both are TRL's loop (generation,
              rewards, accumulation, optimizer), so the difference is the route's loss path and its one teacher
              forward pass (the issue's bound: at most 1.15x)
  opsd-route  the TRL route with objective opsd (frozen teacher)        vs  SDFTTrainer distillation_mode=full_logits
Sizes (random weights, built from a config and saved once so both sides load the same weights):
  tiny        hidden 128, 2 layers, vocabulary 833 (the package's tiny tokenizer)
  qwen-vocab  hidden 64, 2 layers, vocabulary 151,936 (Qwen2/Qwen2.5's output layer), same tiny tokenizer: like a
              real Qwen model the output layer is larger than the tokenizer, ids past the tokenizer decode to nothing
  long        the qwen-vocab model at reasoning lengths: 1,024 new tokens per completion, P=2 x G=2 completions per
              step, micro-batch 1 (this size fixes those four settings whatever the command line says)
  smollm2     SmolLM2-135M-Instruct's architecture (Llama, 576 wide, 30 layers, 9 heads / 3 key-value, MLP 1,536, tied
              49,152-token output layer) with random weights and the same tiny tokenizer; P=4 x G=4, 64 new tokens,
              micro-batch 8 (fixed by the size)

What is the same on both sides: the problems (`number_sums`, the reference solution as TRL's `privileged_context`
and as our problem's solution), the student and teacher prompts token for token (a prompt template registered here,
"<student prompt>\\n\\n<solution>", which is TRL's default `teacher_prompt_template`; checked in every run),
P prompts x G samples generated per optimizer step (TRL: generation_batch_size = per_device_train_batch_size x
gradient_accumulation_steps = P x G, steps_per_generation = gradient_accumulation_steps, num_iterations = 1, so
TRL generates once per optimizer step and computes no old log-probs), micro-batches of --micro-batch rollouts,
AdamW (TRL: optim="adamw_torch") with the same learning rate, no weight decay, gradient clipping at 1.0, float32,
no gradient checkpointing (TRL's default is on; switched off on both sides unless --gradient-checkpointing),
sampling at temperature 1 with no top-k / top-p, and a fixed completion length: min_new_tokens = max_new_tokens on
both sides (TRL through generation_kwargs, ours through the rollout backend's min_new_tokens), so every
completion has exactly --max-new-tokens tokens; the table shows the mean lengths seen, to confirm it.

Each (side, pair, size) runs in its own process, so its peak resident memory (ru_maxrss) is its own; "extra" is the
peak minus the resident memory once the trainer is built (model, teacher or reference copy, before the first step).
Seconds per step: the median over --steps optimizer steps after --warmup warm-up steps (TRL: timed from a
TrainerCallback's on_step_begin to on_step_end, which spans generation, all micro-batches and the optimizer step).
With --rounds R each side runs in R processes, ours and TRL's alternating, and the table shows the median of the
R medians (memory: the median of the R peaks) with each round's time ratio in the note column: on a shared machine
a slow spell then hits both sides instead of one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _harness import WORKER_FLAG, fmt, markdown_table, ratio, run_worker, serve_worker
from _step_vs_trl_sides import PAIRS, SIZES, build_model_dirs, measure_case

SIDES = ("ours", "trl")


# ----------------------------------------------------------------------------------------------
# the parent: one subprocess per (side, pair, size) and round, then the tables

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}


def run_case(spec: dict, timeout: float) -> dict:
    """Run one worker process; returns its result, or {"error": why it produced none}."""
    env = dict(WORKER_ENV)
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    return run_worker(__file__, spec, timeout=timeout, env=env)


def summarize(result: dict) -> dict:
    if "error" in result:
        return {"s": None, "peak": None, "extra": None, "len": None}
    return {"s": statistics.median(result["seconds"]), "peak": result["peak_rss_mib"],
            "extra": result["peak_rss_mib"] - result["rss_loaded_mib"], "len": result["completion_length"]}


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from the worker results of several rounds: seconds per step is the median of the rounds'
    medians, memory the median of their peaks; the first round's other fields (profile included)."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    merged = dict(rounds[0])
    merged["round_seconds"] = [statistics.median(r["seconds"]) for r in rounds]
    merged["seconds"] = [statistics.median(merged["round_seconds"])]
    for key in ("peak_rss_mib", "rss_loaded_mib"):
        merged[key] = statistics.median(r[key] for r in rounds)
    return merged


def workload(args: argparse.Namespace, size: str) -> argparse.Namespace:
    """The command line's settings with those the size fixes (the long size's completion length and counts)."""
    return argparse.Namespace(**{**vars(args), **dict(SIZES[size].workload)})


def run_rounds(args: argparse.Namespace, pair: str, size: str, model_dir: str) -> dict[str, dict]:
    """Both sides of one (pair, size), --rounds times, the sides alternating so that slow spells hit both."""
    rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
    settings = vars(workload(args, size))
    for round_index in range(args.rounds):
        for side in SIDES:
            spec = {"side": side, "pair": pair, "size": size, "model_dir": model_dir,
                    **{k: v for k, v in settings.items() if k not in ("worker", "quick", "timeout", "rounds")}}
            spec["profile"] = args.profile and round_index == 0
            rounds[side].append(run_case(spec, args.timeout))
            summary = summarize(rounds[side][-1])
            status = rounds[side][-1].get("error") or f"{fmt(summary['s'], 3)} s/step"
            print(f"  {pair} / {size} / {side} (round {round_index + 1}): {status}", file=sys.stderr, flush=True)
    return {side: merge_rounds(rounds[side]) for side in SIDES}


def run_all(args: argparse.Namespace, sizes: list[str], pairs: list[str]) -> dict:
    """{(pair, size): {side: merged result}}, the models built once in a temporary folder."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="step-vs-trl-models-") as root:
        model_dirs = build_model_dirs(sizes, Path(root))
        for pair in pairs:
            for size in sizes:
                results[pair, size] = run_rounds(args, pair, size, model_dirs[size])
    return results


def trl_name(pair: str, grpo_beta: float) -> str:
    chosen = PAIRS[pair]
    if chosen.trl == "sdft":
        return f"SDFT {chosen.mode}"
    return "GRPO beta=0" if chosen.route else f"GRPO beta={grpo_beta:g}"


def profiled_sides(results: dict, args: argparse.Namespace, key: str) -> Iterator[tuple[str, str, str, dict]]:
    """(pair, size, the side's name, its result) for every side whose result holds `key`."""
    for (pair, size), sides in results.items():
        for side in SIDES:
            if sides[side].get(key):
                yield pair, size, side if side == "ours" else trl_name(pair, args.grpo_beta), sides[side]


def case_notes(sides: dict, args: argparse.Namespace) -> list[str]:
    """What the note column says of one (pair, size): failures, mismatches, and the time ratio of each round."""
    note = []
    for side in SIDES:
        if "error" in sides[side]:
            note.append(f"{side} failed: {sides[side]['error']}")
        elif not sides[side]["prompts_match"]:
            note.append("TRL's prompt tokens differ from ours")
    expected_rows = [args.prompts * args.group_size] * (args.warmup + args.steps)
    if sides["trl"].get("generated_rows", expected_rows) != expected_rows:
        note.append(f"TRL generated {sides['trl']['generated_rows']} rows, expected one generation of "
                    f"{expected_rows[0]} rows per step")
    lengths = [summarize(sides[side])["len"] for side in SIDES]
    if any(length is not None and abs(length - args.max_new_tokens) > 1e-6 for length in lengths):
        note.append("completion lengths are not fixed")
    if args.rounds > 1 and all("round_seconds" in sides[side] for side in SIDES):
        per_round = [a / b for a, b in zip(sides["ours"]["round_seconds"], sides["trl"]["round_seconds"],
                                           strict=True)]
        note.append("time ratio per round " + " / ".join(f"{r:.2f}" for r in per_round))
    return note


def print_main_table(results: dict, args: argparse.Namespace) -> None:
    rows, long_notes = [], []
    for (pair, size), sides in results.items():
        ours, trl = summarize(sides["ours"]), summarize(sides["trl"])
        note = case_notes(sides, workload(args, size))
        short = "; ".join(n if len(n) <= 160 else n[:157] + "..." for n in note)
        long_notes.extend(f"{pair} / {size}: {n}" for n in note if len(n) > 160)
        name = f"{pair} ({'route' if PAIRS[pair].route else 'ours'} vs {trl_name(pair, args.grpo_beta)})"
        rows.append([name, size, fmt(ours["s"], 3), fmt(trl["s"], 3),
                     ratio(ours["s"], trl["s"]), fmt(ours["peak"], 0), fmt(trl["peak"], 0),
                     ratio(ours["peak"], trl["peak"]), fmt(ours["extra"], 0), fmt(trl["extra"], 0),
                     f"{fmt(ours['len'], 1)} / {fmt(trl['len'], 1)}", short])
    columns = ["pair", "size", "ours s/step", "TRL s/step", "ours/TRL", "ours peak MiB", "TRL peak MiB", "ours/TRL",
               "ours extra MiB", "TRL extra MiB", "completion len ours / TRL", "note"]
    print("\n".join(markdown_table(columns, "llrrrrrrrrrl", rows)))
    for note in long_notes:
        print(f"\n{note}")
    gpu = [(key, side, r["peak_gpu_mib"]) for key, sides in results.items() for side, r in sides.items()
           if "peak_gpu_mib" in r]
    if gpu:
        print("\nPeak GPU memory allocated (MiB): " + ", ".join(f"{p}/{s} {side} {v:.0f}" for (p, s), side, v in gpu))


def print_profile(results: dict, args: argparse.Namespace) -> None:
    print("\nWhere a step's time goes (mean seconds per timed step; nested calls counted in the innermost phase; "
          "TRL's 'student forward' includes its output layer, ours is the decoder only):")
    for pair, size, name, result in profiled_sides(results, args, "phases"):
        phases = result["phases"]
        total = sum(phases.values())
        print(f"\n{pair} / {size} / {name}: {total:.3f} s/step")
        rows = [[phase, f"{value:.3f}", f"{100 * value / total:.0f}%"]
                for phase, value in sorted(phases.items(), key=lambda item: -item[1])]
        print("\n".join(markdown_table(["phase", "s/step", "share"], "lrr", rows)))
    print("\nResident memory during the last timed step, phase by phase in the order entered (MiB; sampled "
          "every 2 ms; 'loaded' is the trainer built, before the first step):")
    for pair, size, name, result in profiled_sides(results, args, "memory_timeline"):
        timeline = result["memory_timeline"]
        print(f"\n{pair} / {size} / {name}: loaded {result['rss_loaded_mib']:.0f}, step start "
              f"{timeline['step_start']:.0f}, process peak {result['peak_rss_mib']:.0f}")
        rows = [[phase, f"{entry:.0f}", f"{highest:.0f}", fmt(leaving, 0)]
                for phase, entry, highest, leaving in timeline["events"]]
        print("\n".join(markdown_table(["phase", "at entry", "highest", "at exit"], "lrrr", rows)))


def print_settings(results: dict, args: argparse.Namespace, sizes: list[str]) -> None:
    import torch
    import transformers
    import trl

    threads = {r["threads"] for sides in results.values() for r in sides.values() if "threads" in r}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    thread_counts = ",".join(map(str, sorted(threads))) or "?"
    rows = args.prompts * args.group_size
    print(f"\nSettings: {device}, torch threads {thread_counts}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; unless a size fixes its own (below): "
          f"P={args.prompts} prompts x "
          f"G={args.group_size} samples per step, {args.max_new_tokens} new tokens (fixed), micro-batch "
          f"{args.micro_batch} (gradient accumulation {rows // args.micro_batch}), lr {args.lr:g}, top-k {args.top_k}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, float32; median of "
          f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} round(s); sizes: "
          + "; ".join(f"{s} = {SIZES[s]}" for s in sizes))


# ----------------------------------------------------------------------------------------------
# the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated, from {','.join(SIZES)} (default: all but smollm2, the slow one)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, from {','.join(PAIRS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: inherited; --quick: 1)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step (P)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length (fixed on both sides)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="rollouts per forward/backward (TRL: per_device_train_batch_size); P*G must divide by it")
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--top-k", type=int, default=100, help="top-k of the opsd-topk pair (TRL: distillation_topk)")
    parser.add_argument("--grpo-beta", type=float, default=0.04,
                        help="GRPO KL coefficient; > 0 loads TRL's frozen reference model (our dasd has a frozen "
                             "teacher); 0 is TRL's default and skips that forward pass")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="worker processes per (side, pair, size), the sides alternating; the table shows the "
                             "median of the rounds' medians (and the time ratio of each round)")
    parser.add_argument("--profile", action="store_true", help="also print where each step's time goes")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: tiny size, P=2, G=2, 8 tokens, micro-batch 2, 2 timed steps, 1 thread")
    parser.add_argument(WORKER_FLAG, help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Apply --quick and check the arguments; returns the sizes and the pairs."""
    if args.quick:
        args.sizes = args.sizes or "tiny"
        args.prompts, args.group_size, args.max_new_tokens, args.micro_batch = 2, 2, 8, 2
        args.steps, args.warmup = 2, 1
        args.threads = 1 if args.threads is None else args.threads
    sizes = (args.sizes or ",".join(s for s in SIZES if s != "smollm2")).split(",")
    pairs = args.pairs.split(",")
    for name, known, chosen in (("size", SIZES, sizes), ("pair", PAIRS, pairs)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {list(known)}")
    rows = args.prompts * args.group_size
    if rows % args.micro_batch:
        parser.error(f"--prompts x --group-size = {rows} must be divisible by --micro-batch {args.micro_batch}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.steps < 1 or args.warmup < 0 or args.group_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --group-size >= 2 (GRPO needs two samples per prompt)")
    return sizes, pairs


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        serve_worker(measure_case, args.worker)
        return
    sizes, pairs = check_args(parser, args)
    import trl  # noqa: F401 - missing TRL fails here, before any worker runs
    started = time.perf_counter()
    results = run_all(args, sizes, pairs)
    print_settings(results, args, sizes)
    print()
    print_main_table(results, args)
    if args.profile:
        print_profile(results, args)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
