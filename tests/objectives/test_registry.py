"""The open registry: a method added from outside the package, its knobs learned from its signature,
and trained through `selfdistill train`."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from selfdistill.config import ConfigError, config_from_dict
from selfdistill.objectives import (
    OBJECTIVES,
    DasdKnobs,
    KnobError,
    ObjectiveBatch,
    check_knob,
    dasd_advantages,
    dasd_direction,
    probe_batch,
    register_objective,
)
from selfdistill.tokenstats import DivergenceSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry():
    """Whatever a test registers is gone afterwards."""
    before = dict(OBJECTIVES)
    yield OBJECTIVES
    OBJECTIVES.clear()
    OBJECTIVES.update(before)


def test_register_objective_as_decorator_learns_knobs_and_presets(registry):
    @register_objective("scaled_distill", divergence=DivergenceSpec(beta=0.0), presets={"weight": 2.0})
    def scaled(batch: ObjectiveBatch, *, weight: float = 1.0, mode: str = "plain") -> tuple[torch.Tensor, dict]:
        return weight * batch.stats.divergence * batch.mask, {}

    assert scaled.__name__ == "scaled"  # the decorator leaves the function as it was
    objective = registry["scaled_distill"]
    assert objective.knob_defaults() == {"weight": 2.0, "mode": "plain"}
    assert objective.needs_teacher and objective.divergence == DivergenceSpec(beta=0.0)
    config = config_from_dict({"objective": {"name": "scaled_distill", "weight": 3, "knobs": {"mode": "x"}}})
    assert config.objective.knobs == {"mode": "x", "weight": 3.0}  # flat and nested; int → float by annotation
    with pytest.raises(ConfigError, match=r"objective\.knobs\.weight .*expected <class 'float'>"):
        config_from_dict({"objective": {"name": "scaled_distill", "knobs": {"weight": "heavy"}}})
    with pytest.raises(ConfigError, match=r"knobs\.wieght .*takes no knob .wieght.; its knobs: weight, mode"):
        config_from_dict({"objective": {"name": "scaled_distill", "wieght": 1.0}})
    with pytest.raises(ConfigError, match=r"objective\.weight: set twice"):
        config_from_dict({"objective": {"name": "scaled_distill", "weight": 1.0, "knobs": {"weight": 2.0}}})


def test_register_objective_with_a_knobs_dataclass(registry):
    @dataclasses.dataclass(frozen=True)
    class ScaleKnobs:
        weight: float = 1.0
        clip: int | None = None

        def __post_init__(self) -> None:
            check_knob(self.weight > 0, "weight", f"must be positive, got {self.weight}")

    @register_objective("scaled_by_dataclass", divergence=DivergenceSpec(beta=0.0), knobs=ScaleKnobs,
                        presets={"clip": 3})
    def scaled(batch: ObjectiveBatch, knobs: ScaleKnobs) -> tuple[torch.Tensor, dict]:
        return knobs.weight * batch.stats.divergence * batch.mask, {}

    objective = registry["scaled_by_dataclass"]
    assert objective.knob_defaults() == {"weight": 1.0, "clip": 3}
    assert objective.knob_types() == {"weight": float, "clip": int | None}
    batch = probe_batch()
    loss, _ = objective(batch, weight=2.0)
    torch.testing.assert_close(loss, 2.0 * batch.stats.divergence)
    assert config_from_dict({"objective": {"name": "scaled_by_dataclass", "weight": 2}}).objective.knobs == {
        "weight": 2.0}
    with pytest.raises(ConfigError, match=r"objective\.knobs\.weight \(objective\.weight\): weight must be positive"):
        config_from_dict({"objective": {"name": "scaled_by_dataclass", "weight": -1.0}})
    with pytest.raises(KnobError, match="method 'scaled_by_dataclass' takes no knob 'wieght'; its knobs: weight, clip"):
        objective.check_knobs({"wieght": 1.0})
    with pytest.raises(ValueError, match=r"two positional arguments \(the batch, the knobs\)"):
        register_objective("one_arg", lambda batch: (batch.mask, {}), knobs=ScaleKnobs)
    with pytest.raises(ValueError, match="knobs must be a dataclass type"):
        register_objective("not_a_dataclass", lambda batch, knobs: (batch.mask, {}), knobs=dict)


def test_a_built_in_methods_knobs_live_in_one_dataclass():
    # Regression (#25): DASD's twelve knobs were written out three times (its loss, its advantages, the router).
    assert OBJECTIVES["dasd"].knobs_type is DasdKnobs
    assert OBJECTIVES["dasd"].knob_defaults() == {f.name: f.default for f in dataclasses.fields(DasdKnobs)}
    for function in (dasd_advantages, dasd_direction):
        keyword = {n for n, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert not keyword & set(OBJECTIVES["dasd"].knob_defaults()), function.__name__


@pytest.mark.parametrize(("method", "role"), [("grpo", "all"), ("rlsd", "all"), ("dasd", "part"), ("opsd", "none")])
def test_advantage_role_found_by_running_the_loss(method, role):
    assert OBJECTIVES[method].advantage_role({}) == role


def test_register_objective_rejects_what_the_trainer_could_not_call(registry):
    def loss(batch, *, k: float = 1.0):
        return batch.mask, {}

    with pytest.raises(ValueError, match="'dasd' is already registered"):
        register_objective("dasd", loss)
    register_objective("dasd", loss, replace=True)
    assert registry["dasd"].loss is loss
    with pytest.raises(ValueError, match=r"every knob needs a default, \['k'\]"):
        register_objective("no_default", lambda batch, *, k: (batch.mask, {}))
    with pytest.raises(ValueError, match="exactly one positional argument"):
        register_objective("two_args", lambda batch, extra: (batch.mask, {}))
    with pytest.raises(ValueError, match=r"presets \['q'\] are not knobs"):
        register_objective("bad_preset", loss, presets={"q": 1})
    with pytest.raises(ValueError, match="unknown aggregation"):
        register_objective("bad_agg", loss, aggregation="sum")


PLUGIN = '''
"""A method from outside selfdistill: REINFORCE on the teacher's log-ratio, times a knob."""
import torch

from selfdistill.objectives import ObjectiveBatch, register_objective


@register_objective("outside_pg", aggregation="token-mean", needs_teacher=True)
def outside_pg(batch: ObjectiveBatch, *, alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    s = batch.stats
    gap = (s.teacher_logp - s.logp).detach()  # [B,T]
    loss = -(alpha * gap + batch.group_adv[:, None]) * s.logp * batch.mask  # [B,T]
    return loss, {"outside/alpha": torch.tensor(alpha), "outside/gap_mean": (gap * batch.mask).sum() / batch.mask.sum()}
'''


def test_a_method_registered_from_outside_trains_through_the_cli(tmp_path):
    package = tmp_path / "plugins" / "myobj"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    config = tmp_path / "outside.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{path: tiny}}
        data: {{dataset: "synthetic:operation_chains", num_problems: 8}}
        rollout: {{prompts_per_step: 2, group_size: 2, max_new_tokens: 8}}
        objective:
          method: outside_pg
          plugins: [myobj]
          knobs: {{alpha: 0.5}}
        optim: {{steps: 2, lr: 1.0e-3, micro_batch_size: 4}}
        logging: {{output_dir: {tmp_path / "run"}, progress: false, tensorboard: false, sample_every: 0}}
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(tmp_path / "plugins")])}
    result = subprocess.run([sys.executable, "-m", "selfdistill", "train", "--config", str(config),
                             "objective.alpha=0.25"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["outside/alpha"] == pytest.approx(0.25) and not m["skipped"] for m in lines)
    assert all("teacher_entropy" in m for m in lines)  # needs_teacher made the trainer score the teacher
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["objective"]["plugins"] == ["myobj"] and saved["objective"]["knobs"] == {"alpha": 0.25}
    # without the plugin the name is unknown, and the error says which names exist
    bad = subprocess.run([sys.executable, "-m", "selfdistill", "train", "--config", str(config),
                          "objective.plugins=[]"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "objective.name: unknown method 'outside_pg'" in bad.stderr


def test_the_docs_table_lists_every_method_with_its_knobs():
    rows = {}
    for line in (REPO / "docs" / "objectives.md").read_text().splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| `") and len(cells) == 6:
            rows[cells[0].strip("| `")] = cells[3]
    assert set(rows) == set(OBJECTIVES)
    for method, knobs in rows.items():
        own = {k: v for k, v in OBJECTIVES[method].knob_defaults().items() if k not in ("eps_low", "eps_high")}
        if "'s" in knobs:  # "egrsd's, lookahead=8": the rest as in the row it names
            continue
        for name, default in own.items():
            assert f"{name}={default!r}" in knobs, (method, name, default)
