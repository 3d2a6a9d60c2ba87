"""The method study: GRPO vs OPSD vs DASD vs EGRSD (and DASD's ablations) in miniature on the CPU.

- `task`: the operation-chain task, its three splits, and which solution tokens are free choices;
- `search_task`: the second task (search with verified checks): StepAcc, recoveries, fork tokens, the
  rich / weak teacher views, in- and out-of-distribution splits (not yet used by the runs);
- `warmstart`: the cached supervised warm start of a tiny model;
- `probes`: held-out accuracy (student or teacher prompt) and free-choice vs forced entropy;
- `runner`: every method × seed from the warm start, in worker processes (`run_study`);
- `report`: tables over seeds, paired differences, plots (`build_report`);
- `cli`: `selfdistill study [--quick] [--seeds S] [--methods ...] [--out DIR]`.

Submodules are imported on use: importing this package loads neither torch nor transformers.
"""
