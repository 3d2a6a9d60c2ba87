"""The method study: GRPO vs OPSD vs DASD vs EGRSD (and DASD's ablations) in miniature on the CPU.

- `search_task`: the default task, search with verified checks: StepAcc, recoveries, fork tokens, the
  rich / weak teacher views, in- and out-of-distribution splits;
- `task`: the first task, operation chains, and which solution tokens are free choices; `StudySplits`;
- `benchmark_task`: a benchmark with a train split (gsm8k) as the task, on a real model: RL pool less a
  validation slice, held out on the test split; `model_base`: that model as every run's base (no warm start);
- `per_problem`: per-problem scores of an evaluation (the unit of the pre-registered claims);
- `settings`: the study's methods (and DASD's sweep), budgets, tasks and warm-start settings;
- `warmstart`: the supervised warm start of a tiny model (shipped with the package, or trained);
- `probes`: held-out accuracy (student or teacher prompt) and teacher-forced entropy by token kind;
- `runner`: the premise check, then every method × seed from the warm start, in worker processes (`run_study`);
- `results`, `claims`, `plots`, `report`: tables over seeds, paired differences, the claims' verdicts,
  plots (`build_report`);
- `cli`: `selfdistill study [--task search|chains|gsm8k] [--model PATH] [--quick] [--sweep] [--seeds S]
  [--methods ...] [--out DIR]`.

Submodules are imported on use: importing this package loads neither torch nor transformers.
"""
