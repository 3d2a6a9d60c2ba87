"""Each built-in method's knobs, written once: a frozen dataclass whose fields (with their defaults) are the
method's knobs, checked when it is built. The method's loss and its advantage function both read it, so a
default lives in one place; the registry exposes the fields as `objective.knobs.<name>` in a config.

A method registered from another package may instead declare its knobs as keyword-only parameters of its loss
(`register_objective`); both forms give the same config keys and the same checks at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfdistill.objectives.policy import check_clip_range, check_knob

DIRECTIONS = ("dasd", "conform", "novelty", "shuffled")
ROUTERS = ("student_entropy", "teacher_entropy")
NORMALIZATIONS = ("mad", "std", "none")
QUANTILE_ENDS = ("top", "bottom")
PUSH_SIGNALS = ("log_ratio", "jsd")


def _check_lam(lam: float) -> None:
    check_knob(0.0 <= lam <= 1.0, "lam", f"must lie in [0, 1], got {lam}")


@dataclass(frozen=True)
class ClipKnobs:
    """GRPO, DAPO, Dr.GRPO: the clipped surrogate's half-widths, `ratio ∈ [1 − eps_low, 1 + eps_high]`."""

    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self) -> None:
        check_clip_range(eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(frozen=True)
class RlsdKnobs:
    """RLSD: `Â_t = A·((1−lam) + lam·clip(exp(sign(A)·δ_t), 1−eps_w, 1+eps_w))`, then the clipped surrogate."""

    lam: float = 0.5
    eps_w: float = 0.2
    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        check_clip_range(eps_w=self.eps_w, eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(frozen=True)
class RlrtKnobs(RlsdKnobs):
    """RLRT: RLSD's weight with the ratio reversed, on successful rollouts only; RLSD's knobs and checks, with
    the whole weight (`lam = 1`) by default."""

    lam: float = 1.0


@dataclass(frozen=True)
class EgrsdKnobs:
    """EGRSD / CL-EGRSD: RLSD's weight times the gate `g_min + (1−g_min)·exp(−H^T/tau_h)`; `lookahead=K` is
    CL-EGRSD (the teacher entropy smoothed over the next K tokens)."""

    lam: float = 1.0
    eps_w: float = 0.2
    g_min: float = 0.2
    tau_h: float = 1.0
    lookahead: int | None = None
    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        check_clip_range(eps_w=self.eps_w, eps_low=self.eps_low, eps_high=self.eps_high)
        check_knob(0.0 < self.g_min <= 1.0, "g_min", f"must lie in (0, 1], got {self.g_min}")
        check_knob(self.tau_h > 0, "tau_h", f"must be positive, got {self.tau_h}")
        check_knob(self.lookahead is None or self.lookahead >= 1, "lookahead", f"must be >= 1, got {self.lookahead}")


@dataclass(frozen=True)
class DasdRoutingKnobs:
    """The knobs DASD and its full-vocabulary variant share: the entropy router that gives ω (`dasd_direction`),
    the term's weight `beta`, and the surrogate's clip."""

    rho: float = 0.2
    beta: float = 0.01
    direction: str = "dasd"
    router: str = "student_entropy"
    normalize: str = "mad"
    gate: bool = True
    quantile: str = "top"
    scale_floor: float = 0.1
    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self) -> None:
        check_knob(0.0 <= self.rho <= 1.0, "rho", f"must lie in [0, 1], got {self.rho}")
        check_knob(self.direction in DIRECTIONS, "direction", f"must be one of {DIRECTIONS}, got {self.direction!r}")
        check_knob(self.router in ROUTERS, "router", f"must be one of {ROUTERS}, got {self.router!r}")
        check_knob(self.normalize in NORMALIZATIONS, "normalize",
                   f"must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        check_knob(self.quantile in QUANTILE_ENDS, "quantile",
                   f"must be one of {QUANTILE_ENDS}, got {self.quantile!r}")
        check_knob(self.scale_floor >= 0, "scale_floor", f"must be >= 0, got {self.scale_floor}")
        check_clip_range(eps_low=self.eps_low, eps_high=self.eps_high)


@dataclass(frozen=True)
class DasdKnobs(DasdRoutingKnobs):
    """DASD: `Â_t = A_i + beta·ω_t·δ̄_t`, ω from the entropy router (`dasd_direction`), then the clipped surrogate;
    on push tokens the signal is `push_signal` (`"jsd"`: AntiSD's bounded JSD_push_beta ascent signal).

    Where the defaults come from (docs/study.md) [recon]: beta = 0.01 and `scale_floor=0.0` are the third study's
    tuning choice (its second registration), on its own seeds (`study.preregistration.TUNING_SEEDS`) and a
    validation slice of the RL pool, never the claims' seeds or held-out sets: the highest mean validation Avg@8
    of beta {0.01, 0.03, 0.1} x floor {0, 0.1} (0.745 for beta 0.01 without a floor; 0.744 for 0.03 without; the
    former defaults 0.03 with floor 0.1: 0.706). `push_signal="jsd"`, the bounded push (it was `"log_ratio"`),
    came from the second study and was then checked on the same validation side (mean validation Avg@8 0.704 vs
    0.651 for the raw log-ratio). None was tuned at an LLM's scale. `DasdDivergenceKnobs` keeps its own beta and
    the floor 0.1 (not tuned by the study).
    """

    scale_floor: float = 0.0
    push_signal: str = "jsd"
    push_beta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_knob(self.push_signal in PUSH_SIGNALS, "push_signal",
                   f"must be one of {PUSH_SIGNALS}, got {self.push_signal!r}")
        check_knob(0.0 < self.push_beta < 1.0, "push_beta", f"must lie in (0, 1), got {self.push_beta}")


@dataclass(frozen=True)
class DasdDivergenceKnobs(DasdRoutingKnobs):
    """DASD's full-vocabulary variant: `ℓ_t = ℓ^GRPO_t + beta·ω_t·D_t`, ω from the same router as DASD."""

    beta: float = 1.0


@dataclass(frozen=True)
class AntisdKnobs:
    """AntiSD: `Â_t = A_i + lam·g_i·δ^J_t` (JSD_beta ascent signal, gated off below mean teacher entropy h_min;
    `floor` optionally clamps δ^J from below at −floor), then the clipped surrogate."""

    lam: float = 0.5
    beta: float = 0.5
    h_min: float = 0.1
    floor: float | None = None
    eps_low: float = 0.2
    eps_high: float = 0.2

    def __post_init__(self) -> None:
        check_knob(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
        check_knob(0.0 < self.beta < 1.0, "beta", f"must lie in (0, 1), got {self.beta}")
        check_knob(self.h_min >= 0, "h_min", f"must be >= 0, got {self.h_min}")
        check_knob(self.floor is None or self.floor > 0, "floor", f"must be positive (or None), got {self.floor}")
        check_clip_range(eps_low=self.eps_low, eps_high=self.eps_high)
