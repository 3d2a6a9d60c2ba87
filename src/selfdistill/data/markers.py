"""The epistemic-marker words of SPEC, shared by the generated tasks that write them and the metric that counts
them (`selfdistill.evaluation.metrics.epistemic_markers`); kept here so the data layer never imports evaluation."""

EPISTEMIC_MARKERS: tuple[str, ...] = (
    "wait",
    "hmm",
    "perhaps",
    "maybe",
    "actually",
    "alternatively",
    "seems",
    "might",
    "likely",
    "check",
)
"""Words that signal a model doubting or revisiting its reasoning (the SDPO/DASD list)."""
