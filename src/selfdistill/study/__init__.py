"""The method study: GRPO vs OPSD vs DASD and their matched controls in miniature on the CPU, judged by claims
registered before the runs.

- `search_task`: the default task, search with verified checks: StepAcc, the marker rate, the verification
  gap, fork tokens, the rich / weak teacher views, in-distribution, validation and out-of-distribution
  (breadth, depth) splits, per-problem scores;
- `task`: the first task, operation chains, and which solution tokens are free choices; `StudySplits`;
- `benchmark_task`: a benchmark with a train split (gsm8k) as the task, on a real model: RL pool less a
  validation slice, held out on the test split; `model_base`: that model as every run's base (no warm start);
- `per_problem`: per-problem scores of an evaluation on free text (the unit of the pre-registered claims);
- `settings`: the study's methods, tuning runs, budgets, tasks and warm-start settings;
- `warmstart`: the supervised warm start of a tiny model (shipped with the package, or trained);
- `probes`: held-out accuracy (student or teacher prompt) and teacher-forced entropy by token kind;
- `preregistration`, `statistics`: the registered claims, seeds, tuning rule and the tests that judge them;
- `runner`: the premise checks, the tuning runs, then every method × claim seed, in worker processes
  (`run_study`);
- `results`, `plots`, `report`: tables over seeds, the claims' verdicts, plots (`build_report`);
- `cli`: `selfdistill study [--task search|chains|gsm8k] [--model PATH] [--quick] [--no-tuning] [--seeds S]
  [--methods ...] [--out DIR]`.

Submodules are imported on use: importing this package loads neither torch nor transformers.
"""
