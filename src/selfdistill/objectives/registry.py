"""Every training method as one entry of `OBJECTIVES`: token statistics in, per-token loss out.

The trainer looks a method up by name, computes the statistics it declares it needs, calls it, and
reduces the per-token loss in the method's aggregation mode (`objective.aggregation` in the config
overrides it): it multiplies the loss by `token_weights` of each micro-batch, computed with the counts of
the whole update (all micro-batches and processes), and sums. That is `aggregate` of the whole update,
which is itself `(loss · token_weights(...)).sum()`; tests/objectives/test_policy.py checks the two agree
(test_trainer_reduction_with_token_weights_is_aggregate_of_the_whole_batch). No if/elif on names.

The built-in losses are in `losses` and `family`; a package of one's own adds a method with
`register_objective` (see docs/objectives.md). A method's knobs are checked here, when a config is loaded
(`Objective.check_knobs`), never at the first step.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfdistill.objectives.policy import AGGREGATIONS, KnobError
from selfdistill.tokenstats import DivergenceSpec, TokenStats

Diagnostics = dict[str, Tensor]


@dataclass
class ObjectiveBatch:
    """What an objective sees for a batch (or a block) of rollouts.

    stats: student statistics with gradient; teacher statistics and divergence as needed.
    mask: `[B,T]` 1 on valid response tokens (EOS included). group_adv: `[B]` group advantages.
    old_logp: `[B,T]` behaviour-policy log-probs; `None` means exactly on-policy (ratio 1).
    step: optimizer steps completed before this one (for methods with a schedule, e.g. REOPOLD's phases).
    Rows are whole rollouts: an objective may compute per-row statistics (positions, quantiles) from `mask`.
    """

    stats: TokenStats
    mask: Tensor
    group_adv: Tensor
    old_logp: Tensor | None = None
    step: int = 0

    @property
    def behaviour_logp(self) -> Tensor:
        return self.stats.logp.detach() if self.old_logp is None else self.old_logp


class UnknownKnobError(KnobError):
    """A knob name the method does not take; the message lists the ones it does."""

    def __init__(self, knob: str, method: str, accepted: list[str]) -> None:
        listed = ", ".join(accepted) or "none"
        ValueError.__init__(self, f"method {method!r} takes no knob {knob!r}; its knobs: {listed}")
        self.knob = knob


def probe_batch(advantage: float = 1.0) -> ObjectiveBatch:
    """A small batch with every statistic (group advantages `±advantage`), to run a method on its knobs when a
    config is loaded."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    stats = TokenStats(logp=-torch.rand(B, T, generator=g) * 2, entropy=torch.rand(B, T, generator=g),
                       teacher_logp=-torch.rand(B, T, generator=g) * 2, teacher_entropy=torch.rand(B, T, generator=g),
                       divergence=torch.rand(B, T, generator=g))
    group_adv = torch.tensor([1.0, -1.0, 0.5, -0.5]) * advantage  # [B]
    return ObjectiveBatch(stats=stats, mask=torch.ones(B, T), group_adv=group_adv)


@dataclass(frozen=True)
class Objective:
    """A named method: its loss function and what the trainer must prepare for it.

    knobs_type: a frozen dataclass of the method's knobs (`objectives.knobs`); the loss is called as
    `loss(batch, knobs)`. None: the knobs are the loss's keyword-only parameters, `loss(batch, **knobs)`.
    uses_old_logp: the loss reads `ObjectiveBatch.old_logp` (a clipped ratio); when it does not, the trainer
    skips the behaviour log-prob pass before several updates per rollout step.
    """

    name: str
    loss: Callable[..., tuple[Tensor, Diagnostics]]
    aggregation: str
    needs_teacher: bool
    divergence: DivergenceSpec | None = None
    std_normalize: bool = True
    presets: tuple[tuple[str, object], ...] = ()
    uses_old_logp: bool = True
    knobs_type: type | None = None

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{self.name}: unknown aggregation {self.aggregation!r}")

    def __call__(self, batch: ObjectiveBatch, **knobs) -> tuple[Tensor, Diagnostics]:
        values = {**dict(self.presets), **knobs}
        if self.knobs_type is None:
            return self.loss(batch, **values)
        return self.loss(batch, self.knobs_type(**values))

    def knob_defaults(self) -> dict[str, object]:
        """Every knob of this method with its default (the knobs' own, then the presets)."""
        return {**_declared_knobs(self.loss, self.knobs_type), **dict(self.presets)}

    def knob_types(self) -> dict[str, Any]:
        """Each knob's annotation (resolved), for a config to check the values it reads."""
        hints = typing.get_type_hints(self.knobs_type or self.loss)
        return {name: hints[name] for name in self.knob_defaults() if name in hints}

    def check_knobs(self, knobs: dict[str, Any]) -> None:
        """Raise `KnobError` (naming the knob) or ValueError / TypeError unless the method runs with `knobs`: the
        names are its knobs, the knobs dataclass accepts the values, and the loss runs on a probe batch."""
        accepted = self.knob_defaults()
        for name in knobs:
            if name not in accepted:
                raise UnknownKnobError(name, self.name, list(accepted))
        self(probe_batch(), **knobs)

    def advantage_role(self, knobs: dict[str, Any]) -> str:
        """How the method uses the group advantage, found by running its loss on a probe batch: `all` (with
        every advantage 0 its loss has no gradient: grpo, rlsd, egrsd, ...), `part` (it has a gradient without
        advantages, and another with them: dasd), or `none` (advantages unused: opsd)."""
        gradients = []
        for advantage in (0.0, 1.0):
            batch = probe_batch(advantage)
            stats = batch.stats
            leaves = [x.requires_grad_(True) for x in (stats.logp, stats.entropy, stats.divergence)]
            loss, _ = self(batch, **knobs)
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            gradients.append(sum(float(g.abs().sum()) for g in grads if g is not None))
        without, with_advantage = gradients
        if without == 0.0:
            return "all"
        return "none" if without == with_advantage else "part"


@dataclass(frozen=True)
class BlockObjective:
    """One micro-batch's objective as the fused kernel (`tokenstats.hidden_objective`) calls it, a block of rows at
    a time: the block's statistics in, `(loss, diagnostics)` out, nothing else touched.

    loss: the block's per-token loss times `token_weights` (the aggregation, with the counts of the whole update),
    summed. diagnostics: the method's diagnostics, each times the block's token count, so that the kernel's sum
    over the blocks divided by the micro-batch's token count is their token-weighted mean.
    """

    objective: Objective
    knobs: dict[str, Any]
    mask: Tensor  # [b,T]
    group_adv: Tensor  # [b]
    token_weights: Tensor  # [b,T]
    old_logp: Tensor | None = None  # [b,T]; None: exactly on-policy
    step: int = 0

    def __call__(self, stats: TokenStats, rows: slice) -> tuple[Tensor, Diagnostics]:
        mask = self.mask[rows]  # [r,T]
        batch = ObjectiveBatch(stats=stats, mask=mask, group_adv=self.group_adv[rows], step=self.step,
                               old_logp=None if self.old_logp is None else self.old_logp[rows])
        per_token, diagnostics = self.objective(batch, **self.knobs)  # [r,T]
        tokens = mask.sum()
        return (per_token * self.token_weights[rows]).sum(), {
            name: value.detach().float() * tokens for name, value in diagnostics.items()}


def loss_knobs(loss: Callable[..., object]) -> dict[str, object]:
    """The keyword-only parameters of a loss function and their defaults: the method's knobs."""
    return {name: p.default for name, p in inspect.signature(loss).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _declared_knobs(loss: Callable[..., object], knobs_type: type | None) -> dict[str, object]:
    if knobs_type is None:
        return loss_knobs(loss)
    return {f.name: f.default for f in dataclasses.fields(knobs_type)}


OBJECTIVES: dict[str, Objective] = {}
"""Every method by name. Add to it with `register_objective`, not by assignment."""


def register_objective(
    name: str,
    loss: Callable[..., tuple[Tensor, Diagnostics]] | None = None,
    *,
    aggregation: str = "token-mean",
    needs_teacher: bool = True,
    divergence: DivergenceSpec | None = None,
    std_normalize: bool = True,
    presets: dict[str, object] | None = None,
    uses_old_logp: bool = True,
    knobs: type | None = None,
    replace: bool = False,
):
    """Add a method to `OBJECTIVES`; as a function, or as a decorator when `loss` is left out:

        @register_objective("my_method", aggregation="token-mean", needs_teacher=True)
        def my_loss(batch: ObjectiveBatch, *, alpha: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
            ...

    `loss(batch, **knobs)` gets an `ObjectiveBatch` and returns a per-token loss `[B,T]` (zero where
    `batch.mask` is 0) and a dict of scalar diagnostics. Its keyword-only parameters, each with a default,
    are the method's knobs: `objective.knobs.<name>` (or `objective.<name>`) in a config sets them, checked
    against their annotations. Or pass `knobs=` a frozen dataclass whose fields (each with a default) are the
    knobs, checked in its `__post_init__`; the loss is then called as `loss(batch, knobs_instance)` (the
    built-in methods do this, so that a loss and its advantage function read one set of defaults).
    `needs_teacher` makes the trainer score the teacher (`stats.teacher_logp`, `stats.teacher_entropy`);
    `divergence` makes it compute `stats.divergence` with that spec; `presets` override knob defaults for this
    name (one loss can back several methods); `uses_old_logp=False` says the loss never reads
    `batch.old_logp` (no clipped ratio), so the trainer skips the behaviour log-prob pass before several
    updates per rollout step (`optim.ppo_epochs`, `optim.mini_batches`). A taken name is an error unless
    `replace=True`. Returns the loss (so the decorator leaves the function as it was).
    """
    if loss is None:
        return lambda fn: register_objective(name, fn, aggregation=aggregation, needs_teacher=needs_teacher,
                                             divergence=divergence, std_normalize=std_normalize, presets=presets,
                                             uses_old_logp=uses_old_logp, knobs=knobs, replace=replace)
    if not name or not isinstance(name, str):
        raise ValueError(f"an objective needs a non-empty name, got {name!r}")
    if name in OBJECTIVES and not replace:
        raise ValueError(f"objective {name!r} is already registered (pass replace=True to override it)")
    positional = [p for p in inspect.signature(loss).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    wanted = ("one positional argument (the batch)" if knobs is None
              else "two positional arguments (the batch, the knobs)")
    if len(positional) != (1 if knobs is None else 2):
        raise ValueError(f"{name}: the loss must take exactly {wanted}, got {[p.name for p in positional]}")
    if knobs is not None and not (dataclasses.is_dataclass(knobs) and isinstance(knobs, type)):
        raise ValueError(f"{name}: knobs must be a dataclass type, got {knobs!r}")
    declared = _declared_knobs(loss, knobs)
    missing = [k for k, default in declared.items() if default is inspect.Parameter.empty
               or default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{name}: every knob needs a default, {missing} have none")
    unknown = sorted(set(presets or {}) - set(declared))
    if unknown:
        raise ValueError(f"{name}: presets {unknown} are not knobs of {loss.__name__} ({sorted(declared)})")
    OBJECTIVES[name] = Objective(name, loss, aggregation, needs_teacher=needs_teacher, divergence=divergence,
                                 std_normalize=std_normalize, presets=tuple((presets or {}).items()),
                                 uses_old_logp=uses_old_logp, knobs_type=knobs)
    return loss
