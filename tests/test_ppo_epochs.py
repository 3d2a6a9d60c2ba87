"""Several clipped updates per rollout step (`optim.ppo_epochs` × `optim.mini_batches`): scored once, the ratio
leaves 1 and the clip engages, each mini-batch is normalized by its own counts, 1 × 1 is the on-policy update,
and a resumed run repeats the straight one."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_trainer import _final_weights, length_reward, tiny_config

from selfdistill.checkpoint import find_checkpoint
from selfdistill.config import ConfigError
from selfdistill.scoring import RolloutGroup, minibatches
from selfdistill.trainer import StepLog, Trainer, Update


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _record_objective(trainer: Trainer) -> list[dict]:
    """Wrap the trainer's objective: every call's update index, `logp − old_logp` and the teacher's log-probs on
    valid tokens, and the clip fraction."""
    calls, update = [], {"index": -1}
    loss, update_rows = trainer.objective.loss, trainer._update

    def recording_loss(batch, *knobs_object, **knobs):  # a knobs dataclass (built-ins) or keyword knobs
        out = loss(batch, *knobs_object, **knobs)
        valid = batch.mask.bool()
        shift = None if batch.old_logp is None else (batch.stats.logp.detach() - batch.old_logp)[valid]
        teacher = None if batch.stats.teacher_logp is None else batch.stats.teacher_logp[valid]
        calls.append({"update": update["index"], "shift": shift, "teacher_logp": teacher,
                      "clip_fraction": float(out[1].get("clip_fraction", math.nan))})
        return out

    def counting_update(*args, **kwargs):
        update["index"] += 1
        return update_rows(*args, **kwargs)

    trainer.objective = dataclasses.replace(trainer.objective, loss=recording_loss)
    trainer._update = counting_update
    return calls


def test_config_keys_are_validated(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="optim.ppo_epochs: must be >= 1, got 0"):
        tiny_config(tmp_path, optim={"ppo_epochs": 0})
    with pytest.raises(ConfigError, match="optim.mini_batches: must be >= 1, got 0"):
        tiny_config(tmp_path, optim={"mini_batches": 0})
    with pytest.raises(ConfigError, match=r"optim.mini_batches: 9 mini-batches but a step has only 8 rollouts"):
        tiny_config(tmp_path, optim={"mini_batches": 9})  # 2 prompts x 4 samples
    config = tiny_config(tmp_path, optim={"mini_batches": 8})  # fits one process ...

    class TwoProcesses:  # ... not each of two: refused at set-up, before the model loads
        def __init__(self, cpu):
            from accelerate.utils import DistributedType

            self.num_processes, self.process_index, self.device = 2, 0, torch.device("cpu")
            self.distributed_type = DistributedType.MULTI_CPU

    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", TwoProcesses)
    with pytest.raises(ConfigError, match="optim.mini_batches=8 exceeds the 4 rollouts each of the 2 processes"):
        Trainer(config, reward_fn=length_reward)


def test_minibatches_take_whole_prompt_groups_where_they_can():
    expected = {1: [[0, 1, 2, 3, 4, 5]], 2: [[0, 1, 2, 3], [4, 5]], 3: [[0, 1], [2, 3], [4, 5]],
                4: [[0, 1], [2, 3], [4], [5]], 6: [[0], [1], [2], [3], [4], [5]]}
    for parts, rows in expected.items():  # 3 prompts x 2 samples
        assert minibatches(6, group_size=2, parts=parts) == rows


def test_shuffled_minibatches_are_a_seeded_partition_of_the_same_sizes():
    """Shuffled parts: every row once, each part's rows ascending and whole prompt groups, the unshuffled parts'
    sizes; the same parts for the same seed, other parts for other seeds; one part is every row whatever the seed."""
    plain = minibatches(12, group_size=2, parts=3)
    drawn = {seed: minibatches(12, group_size=2, parts=3, seed=seed) for seed in range(6)}
    for parts in drawn.values():
        assert sorted(row for part in parts for row in part) == list(range(12))
        assert [len(part) for part in parts] == [len(part) for part in plain]
        assert all(part == sorted(part) and all(part[i] // 2 == part[i + 1] // 2 for i in range(0, len(part), 2))
                   for part in parts)
    assert drawn[0] == minibatches(12, group_size=2, parts=3, seed=0)
    assert len({str(parts) for parts in drawn.values()}) > 1
    assert minibatches(12, group_size=2, parts=1, seed=3) == [list(range(12))]
    rows = minibatches(6, group_size=4, parts=3, seed=1)  # fewer prompts than parts: single rows
    assert sorted(row for part in rows for row in part) == list(range(6)) and [len(p) for p in rows] == [2, 2, 2]


def test_the_trainer_draws_new_parts_each_epoch_and_step(tmp_path):
    """`optim.shuffle_minibatches` (default on): the parts of an epoch are drawn from (seed, step, epoch); off, the
    consecutive parts every epoch."""
    config = tiny_config(tmp_path, optim={"ppo_epochs": 2, "mini_batches": 4}, rollout={"prompts_per_step": 8})
    trainer = Trainer(config, reward_fn=length_reward)
    group = trainer._rollouts(trainer._step_problems())
    draws = {(step, epoch): None for step in range(3) for epoch in range(3)}
    for step, epoch in draws:
        trainer.step = step
        draws[step, epoch] = trainer._update_batches(group, epoch)
    assert len({str(parts) for parts in draws.values()}) > 1
    trainer.step = 1
    assert trainer._update_batches(group, 2) == draws[1, 2]  # a resumed run draws the same
    trainer.config.optim.shuffle_minibatches = False
    assert trainer._update_batches(group, 2) == minibatches(len(group.responses), 2, 4)
    trainer.grader.close()


@pytest.mark.parametrize(("method", "teacher"), [("grpo", "frozen"), ("dasd", "live")])
def test_one_by_one_is_todays_on_policy_update(tmp_path, monkeypatch, method, teacher):
    """1 × 1 takes the on-policy path (no scoring pass, ratio 1) and ends bit for bit where the step before
    `ppo_epochs` existed ends; and the scored path, given one update, makes the very same update (the behaviour
    log-probs and cached teacher states are exactly what the update computes)."""
    config = tiny_config(tmp_path, objective={"name": method, "teacher": teacher},
                         optim={"ppo_epochs": 1, "mini_batches": 1})
    new = Trainer(config, run_dir=tmp_path / "new", reward_fn=length_reward)
    monkeypatch.setattr(Trainer, "_score_rollouts", lambda *a: pytest.fail("1 x 1 ran a scoring pass"))
    metrics = new.train_step()
    monkeypatch.undo()
    assert metrics["updates"] == 1 and metrics["clip_fraction"] == 0.0 and not metrics["skipped"]

    old = Trainer(config, run_dir=tmp_path / "old", reward_fn=length_reward)
    group = old._rollouts(old._step_problems())
    # the recorded expectation: the step as it was written before ppo_epochs (trainer.py at 47d89ff)
    old.optimizer.zero_grad(set_to_none=True)
    loss = old._update(old._on_policy(group), StepLog())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(old.params, old.config.optim.max_grad_norm))
    on_policy_grads = _grads(old)
    old.optimizer.step()
    old.scheduler.step()
    if old.teacher is not None:
        old.teacher.update()
    assert loss == metrics["loss"] and grad_norm == metrics["grad_norm"]
    _assert_equal(dict(new.model.named_parameters()), dict(old.model.named_parameters()))

    again = Trainer(config, run_dir=tmp_path / "again", reward_fn=length_reward)
    again.optimizer.zero_grad(set_to_none=True)
    scored = again._score_rollouts(group)
    assert again._update(Update(group, list(range(len(group.responses))), again._advantages(group), scored),
                         StepLog()) == loss
    torch.nn.utils.clip_grad_norm_(again.params, again.config.optim.max_grad_norm)
    _assert_equal(_grads(again), on_policy_grads)
    for trainer in (new, old, again):
        trainer.grader.close()


@pytest.mark.parametrize("method", ["grpo", "dasd"])
def test_ratio_leaves_one_and_the_clip_engages(tmp_path, method):
    trainer = Trainer(tiny_config(tmp_path, objective={"name": method, "teacher": "live"},
                                  optim={"lr": 1e-2, "ppo_epochs": 2, "mini_batches": 2}), reward_fn=length_reward)
    calls = _record_objective(trainer)
    metrics = trainer.train_step()
    assert metrics["updates"] == 4 and not metrics["skipped"] and math.isfinite(metrics["loss"])
    first = [c for c in calls if c["update"] == 0]
    later = [c for c in calls if c["update"] > 0]
    assert first and {c["update"] for c in later} == {1, 2, 3}
    for call in first:  # scored over the same micro-batches before any update: the ratio is exactly 1
        assert torch.equal(call["shift"], torch.zeros_like(call["shift"])) and call["clip_fraction"] == 0.0
    assert all(call["shift"].abs().max() > 0 for call in later)  # every later update is off-policy
    assert max(c["clip_fraction"] for c in calls if c["update"] >= 2) > 0  # the second epoch clips
    assert metrics["clip_fraction"] > 0
    assert metrics["approx_kl"] > 0  # the later updates moved away from the behaviour policy
    trainer.grader.close()


@pytest.mark.parametrize(("method", "teacher"), [("dasd", "live"), ("dasd", "ema"), ("opsd", "live")])
def test_the_teachers_targets_hold_still_for_the_step_and_the_ema_follows_once(tmp_path, method, teacher):
    """A live teacher is the student's current weights: its hidden states and output weight are taken before the
    first update, so the second epoch sees the first epoch's targets exactly; the EMA teacher moves once, after
    the step's updates. OPSD has no ratio: no behaviour log-probs are computed for it."""
    trainer = Trainer(tiny_config(tmp_path, objective={"name": method, "teacher": teacher, "ema_decay": 0.5},
                                  optim={"lr": 1e-2, "ppo_epochs": 2}), reward_fn=length_reward)
    calls = _record_objective(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.train_step()
    assert metrics["updates"] == 2
    assert trainer.scheduler.last_epoch == 1  # the LR schedule counts rollout steps, not updates
    first = [c for c in calls if c["update"] == 0]
    second = [c for c in calls if c["update"] == 1]
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):  # the same rows in the same blocks, one update apart
        assert torch.equal(a["teacher_logp"], b["teacher_logp"])
        if method == "opsd":
            assert a["shift"] is None and b["shift"] is None  # old_logp None: not computed
        else:
            assert b["shift"].abs().max() > 0  # while the student did move
    if teacher == "ema":
        for name, param in trainer.teacher.copy.named_parameters():
            student = dict(trainer.model.named_parameters())[name].detach()
            torch.testing.assert_close(param, before[name].lerp(student, 0.5), rtol=0, atol=1e-7, msg=name)
    trainer.grader.close()


@pytest.mark.parametrize("method", ["grpo", "dasd"])  # seq-mean-token-mean, token-mean
def test_each_minibatch_is_normalized_by_its_own_counts(tmp_path, method):
    """The update of a mini-batch is, bit for bit, the on-policy update of a step made of that mini-batch alone:
    the counts are the mini-batch's, the group advantages the step's (whole groups), the teacher states its own."""
    config = tiny_config(tmp_path, objective={"name": method},
                         optim={"ppo_epochs": 2, "mini_batches": 2, "shuffle_minibatches": False})
    trainer = Trainer(config, reward_fn=length_reward)
    group = trainer._rollouts(trainer._step_problems())
    parts = trainer._update_batches(group, epoch=1)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    scored = trainer._score_rollouts(group)
    for rows in parts:
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = trainer._update(Update(group, rows, trainer._advantages(group), scored), StepLog())
        minibatch_grads = _grads(trainer)
        alone = RolloutGroup(group.problems, [group.prompt_of_row[r] for r in rows],
                             [group.responses[r] for r in rows], [group.texts[r] for r in rows],
                             [group.truncated[r] for r in rows], group.rewards[rows])
        trainer.optimizer.zero_grad(set_to_none=True)
        assert trainer._update(trainer._on_policy(alone), StepLog()) == loss
        _assert_equal(minibatch_grads, _grads(trainer))
    trainer.grader.close()


def test_a_ppo_step_does_not_depend_on_the_micro_batch_size(tmp_path):
    weights = []
    for micro in (1, 3, 8):
        config = tiny_config(tmp_path, objective={"name": "dapo"},
                             optim={"micro_batch_size": micro, "ppo_epochs": 2, "mini_batches": 2})
        trainer = Trainer(config, run_dir=tmp_path / str(micro), reward_fn=length_reward)
        metrics = trainer.train_step()
        assert metrics["updates"] == 4
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        trainer.grader.close()
    for other in weights[1:]:
        for name in weights[0]:
            torch.testing.assert_close(other[name], weights[0][name], rtol=1e-5, atol=1e-5, msg=name)


def test_resume_gives_identical_metrics_and_parameters(tmp_path):
    def config(folder):
        return tiny_config(tmp_path / folder, optim={"steps": 3, "ppo_epochs": 2, "mini_batches": 2},
                           rollout={"group_size": 2},
                           objective={"name": "dasd", "teacher": "ema"})

    Trainer(config("a"), reward_fn=length_reward).run()
    Trainer(config("b"), reward_fn=length_reward).run(until=2)
    trainer = Trainer(config("b"), resume=find_checkpoint(tmp_path / "b" / "run"), reward_fn=length_reward)
    assert trainer.step == 2
    trainer.run()
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    _assert_equal(a, b)

    def metrics(folder):
        lines = (tmp_path / folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")} for line in lines]

    assert [m["step"] for m in metrics("b")] == [1, 2, 3]
    assert metrics("a") == metrics("b")
    assert all(m["updates"] == 4 for m in metrics("a"))


def test_two_processes_make_the_same_updates_as_one(tmp_path):
    """4 prompts, 2 mini-batches: one process's parts are prompts {0,1} and {2,3}; with 2 processes (prompts
    0, 2 and 1, 3) each process's parts are one prompt, and the k-th parts together are the same prompts, so the
    4 updates match when each is normalized by its mini-batch's counts summed over the processes. (Consecutive
    parts every epoch: shuffled, each process would draw its own rows' parts, `optim.shuffle_minibatches`.)"""
    args = ["model.path=tiny", "data.dataset=synthetic:operation_chains", "data.num_problems=8",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=12", "optim.steps=1",
            "optim.lr=1e-3", "optim.ppo_epochs=2", "optim.mini_batches=2", "optim.shuffle_minibatches=false",
            "objective.name=opsd",
            "logging.progress=false", "logging.tensorboard=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "selfdistill", "train"]
    two = subprocess.run([*launch, *args, f"logging.output_dir={tmp_path / 'two'}"], capture_output=True, text=True,
                         env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    single = [sys.executable, "-m", "selfdistill", "train"]
    one = subprocess.run([*single, *args, f"logging.output_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    metrics_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    assert metrics_two["processes"] == 2 and metrics_one["processes"] == 1
    assert metrics_two["updates"] == metrics_one["updates"] == 4
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5, abs=1e-7)
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    from selfdistill.models import load_model

    initial, _ = load_model("tiny")
    assert any(not torch.allclose(p, a[n], atol=1e-6) for n, p in initial.named_parameters() if n in a)
