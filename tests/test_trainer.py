"""The trainer on the built-in tiny model: every method updates it, teachers behave, runs resume exactly,
PPO epochs over mini-batches, the shared-prefix update, and the collectives of a step."""

import copy
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from selfdistill.checkpoint import find_checkpoint
from selfdistill.collectives import Collectives
from selfdistill.config import config_from_dict
from selfdistill.forward import pack, pack_shared
from selfdistill.objectives import OBJECTIVES
from selfdistill.scoring import RolloutGroup, minibatches
from selfdistill.trainer import StepLog, Trainer, Update, resume
from tests.helpers import _final_weights, assert_grads_match, length_reward, tiny_config


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_one_step_changes_every_parameter_with_finite_loss(tmp_path, method):
    trainer = Trainer(tiny_config(tmp_path, objective={"name": method}), reward_fn=length_reward)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and not metrics["skipped"]
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{method}: parameters not updated: {unchanged}"
    assert metrics["response_length"] > 0 and 0 <= metrics["truncation_rate"] <= 1
    if OBJECTIVES[method].needs_teacher:
        assert "teacher_entropy" in metrics
    trainer.grader.close()


def test_frozen_teacher_stays_at_initial_weights_and_gets_no_gradient(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, objective={"name": "dasd", "teacher": "frozen"}),
                      reward_fn=length_reward)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(2):
        trainer.train_step()
    teacher = trainer.teacher.copy
    for name, param in teacher.named_parameters():
        assert torch.equal(param, initial[name]), name
        assert param.grad is None and not param.requires_grad
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    trainer.grader.close()


def test_lora_frozen_teacher_is_the_base_model_without_a_copy(tmp_path):
    config = tiny_config(tmp_path, model={"lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]},
                         objective={"name": "opsd"}, optim={"lr": 1e-2})
    trainer = Trainer(config)
    assert trainer.teacher.copy is None and trainer.teacher.uses_adapter_switch
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    from selfdistill.forward import pack

    problem = trainer.problems[0]
    batch = pack([trainer.prompts.teacher_ids(problem)], [[5, 6, 7]], pad_id=trainer.pad_id)
    hidden_before, _ = trainer.teacher.hidden_states(batch)
    trainer.train_step()
    trainer.train_step()
    hidden_after, _ = trainer.teacher.hidden_states(batch)
    torch.testing.assert_close(hidden_after, hidden_before)  # the teacher did not move
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name  # only adapters train
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # and they did train
    trainer.grader.close()


def test_resume_gives_identical_parameters(tmp_path):
    straight = tiny_config(tmp_path / "a", optim={"steps": 4}, objective={"name": "dasd", "teacher": "ema"})
    Trainer(straight, reward_fn=length_reward).run()
    split = tiny_config(tmp_path / "b", optim={"steps": 4}, objective={"name": "dasd", "teacher": "ema"})
    Trainer(split, reward_fn=length_reward).run(until=2)
    from selfdistill.checkpoint import find_checkpoint

    trainer = Trainer(tiny_config(tmp_path / "b", optim={"steps": 4}, objective={"name": "dasd", "teacher": "ema"}),
                      resume=find_checkpoint(tmp_path / "b" / "run"), reward_fn=length_reward)
    assert trainer.step == 2
    trainer.run()
    a, b = _final_weights(tmp_path / "a" / "run"), _final_weights(tmp_path / "b" / "run")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


KILL_DURING_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import selfdistill.checkpoint as ckpt
    from selfdistill.config import load_config
    from selfdistill.trainer import Trainer

    real_save = ckpt.torch.save
    calls = {"n": 0}
    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 files per checkpoint: the 4th is the second checkpoint's optimizer state
            real_save(obj, path, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)
    ckpt.torch.save = dying_save
    Trainer(load_config(None, sys.argv[1:])).run()
""")


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path):
    run = tmp_path / "run"
    args = ["model.path=tiny", "data.dataset=synthetic:operation_chains", "data.num_problems=8",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "optim.steps=3",
            "logging.checkpoint_every=1", f"logging.output_dir={run}", "logging.progress=false",
            "logging.tensorboard=false", "objective.name=opsd"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT, *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "checkpoint-000002.tmp").exists()  # the interrupted write
    assert (run / "checkpoint-000001" / "COMPLETE").exists()
    out = resume(run, {"logging": {"progress": False}})
    assert out == run
    from selfdistill.checkpoint import complete_checkpoints

    assert complete_checkpoints(run)[-1].name == "checkpoint-000003"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_optimizer_state_loads_with_weights_only(tmp_path):
    Trainer(tiny_config(tmp_path, optim={"steps": 1}), reward_fn=length_reward).run()
    checkpoint = sorted((tmp_path / "run").glob("checkpoint-*"))[-1]
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["state"]


def train_in_one_and_two_processes(tmp_path: Path, args: list[str]) -> None:
    """`selfdistill train` with `args` in one process (into tmp_path/one) and in two (into tmp_path/two):
    accelerate runs several CPU processes through torchrun when asked for --multi_gpu (gloo backend)."""
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


def test_two_processes_with_half_the_batch_each_match_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (torchrun + gloo): the same update as
    one process with the whole batch."""
    args = ["model.path=tiny", "data.dataset=synthetic:operation_chains", "data.num_problems=8",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=12", "optim.steps=1",
            "optim.lr=1e-3", "objective.name=opsd", "logging.progress=false", "logging.tensorboard=false"]
    # opsd: a smooth loss. (DASD's router divides by the spread of the entropies, which is ~1e-4 for an
    # untrained model, so padding-level float differences between the two layouts get amplified.)
    train_in_one_and_two_processes(tmp_path, args)
    metrics_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    assert metrics_two["processes"] == 2 and metrics_one["processes"] == 1
    assert metrics_two["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5, abs=1e-7)
    # Every per-step diagnostic is the mean over both processes' tokens, not rank 0's alone (issue #14).
    assert set(metrics_two) == set(metrics_one) and "entropy" in metrics_one and "divergence" in metrics_one
    for key, value in metrics_one.items():
        if not key.startswith("seconds") and key != "processes":
            assert metrics_two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for name in a:
        # lr = 1e-3 and Adam's first step is ~lr·sign(g): 1e-5 is 1 % of a step
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    from selfdistill.models import load_model

    initial, _ = load_model("tiny")
    moved = [n for n, p in initial.named_parameters() if n in a and not torch.allclose(p, a[n], atol=1e-6)]
    assert moved  # a real update happened, and both runs made the same one


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_and_output_gradients_go_into_dense_grads_in_place(tmp_path, tie):
    """Full fine-tuning: the embedding's gradient is sparse (rows looked up) and the output layer's is added by
    the fused path, both into dense .grad tensors; the gradients equal those of plain dense autograd."""
    from selfdistill.trainer import StepLog
    from selfdistill.training_setup import prepare_model

    config = tiny_config(tmp_path, objective={"name": "opsd"})
    trainers = []
    for sparse in (True, False):
        trainer = Trainer(config, run_dir=tmp_path / str(sparse), reward_fn=length_reward)
        if not tie:  # an untied copy of the same weights
            untied_config = copy.deepcopy(trainer.model.config)
            untied_config.tie_word_embeddings = False
            untied = type(trainer.model)(untied_config)
            untied.load_state_dict(trainer.model.state_dict(), strict=False)
            untied.lm_head.weight.data.copy_(trainer.model.get_input_embeddings().weight.data)
            trainer.model = prepare_model(untied, trainer.config.model)
            trainer.teacher.copy = copy.deepcopy(trainer.model).eval().requires_grad_(False)
            trainer.params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.model.get_input_embeddings().sparse = sparse
        trainers.append(trainer)
    sparse_run, dense_run = trainers
    assert sparse_run.model.get_input_embeddings().sparse  # what prepare_model sets for full fine-tuning
    group = sparse_run._rollouts(sparse_run._step_problems())
    grads = []
    for trainer in trainers:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._update(trainer._on_policy(group), StepLog())
        grads.append({n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad})
        trainer.grader.close()
    for name, grad in grads[0].items():
        assert grad.layout == torch.strided, name
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["model.embed_tokens.weight"].abs().sum() > 0
    if not tie:
        assert grads[0]["lm_head.weight"].abs().sum() > 0
        assert not torch.equal(grads[0]["lm_head.weight"], grads[0]["model.embed_tokens.weight"])


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
    # Micro-batches sum the loss in another order. Where a gradient entry is the residue of cancelling terms, that
    # order changes it relatively much, and Adam, sign-like on its first updates, turns it into up to a step's size:
    # on AVX-512 machines one entry in 16k moved 1.3e-5 (lr 1e-3). Almost every entry must agree to 1e-5, and each
    # within a tenth of a step; a wrong normalization or a lost micro-batch moves most entries by far more.
    lr = config.optim.lr
    for other in weights[1:]:
        for name in weights[0]:
            gap = (other[name] - weights[0][name]).abs()
            assert (gap > 1e-5).float().mean() <= 1e-4, name
            assert gap.max() <= 0.1 * lr, name


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
    train_in_one_and_two_processes(tmp_path, args)
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


def _trainer(tmp_path, shared_prefix: bool, **sections):
    from selfdistill.trainer import Trainer

    sections.setdefault("optim", {})["shared_prefix"] = shared_prefix
    return Trainer(tiny_config(tmp_path / str(shared_prefix), **sections), reward_fn=length_reward)


@pytest.mark.parametrize(
    "sections",
    [
        {"objective": {"name": "opsd"}},
        {"objective": {"name": "rlsd"}, "data": {"template": "sibling"}},  # teacher prompts differ per row
        {"objective": {"name": "opsd", "teacher": "frozen"},
         "model": {"lora_rank": 4, "lora_targets": ["q_proj", "v_proj"]}},
    ],
    ids=["opsd", "rlsd-sibling", "opsd-lora"],
)
def test_one_update_is_the_same_with_and_without_the_shared_prefix(tmp_path, sections):
    import copy

    from selfdistill.trainer import StepLog

    on = _trainer(tmp_path, True, **copy.deepcopy(sections))
    off = _trainer(tmp_path, False, **copy.deepcopy(sections))
    assert on.pack_student is pack_shared and on.pack_teacher is pack_shared
    assert off.pack_student is pack and off.pack_teacher is pack
    group = on._rollouts(on._step_problems())  # one set of rollouts for both: only the packing differs
    assert len(set(group.prompt_of_row[:on.config.optim.micro_batch_size])) < on.config.optim.micro_batch_size
    results = []
    for trainer in (on, off):
        trainer.optimizer.zero_grad(set_to_none=True)
        log = StepLog()
        loss = trainer._update(trainer._on_policy(group), log)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss, log.means(), grads))
        trainer.grader.close()
    (loss_on, log_on, grads_on), (loss_off, log_off, grads_off) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-7)
    assert log_on.keys() == log_off.keys() and "teacher_entropy" in log_on
    for name in log_on:
        assert log_on[name] == pytest.approx(log_off[name], rel=1e-4, abs=1e-6), name
    assert grads_on.keys() == grads_off.keys()
    names = list(grads_off)
    assert_grads_match([grads_on[n] for n in names], [grads_off[n] for n in names], names, all_nonzero=False)


def test_trainer_falls_back_for_the_student_under_gradient_checkpointing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="selfdistill.training_setup"):
        trainer = _trainer(tmp_path, True, model={"gradient_checkpointing": True}, objective={"name": "opsd"})
    assert trainer.pack_student is pack and trainer.pack_teacher is pack_shared
    assert "the student forward packs every row's prompt in full: gradient checkpointing" in caplog.text
    metrics = trainer.train_step()
    assert not metrics["skipped"] and torch.isfinite(torch.tensor(metrics["loss"]))
    trainer.grader.close()


def test_every_collective_of_a_step_goes_through_collectives_on_the_model_device(tmp_path, monkeypatch):
    """A step with two (simulated) processes: every sum across processes is made by `Collectives` (a direct
    `torch.distributed.all_reduce`, which got CPU tensors before, fails here), each on the model's device, and
    the gradients go in bounded buckets, never as one flat copy of all of them."""
    trainer = Trainer(tiny_config(tmp_path, objective={"name": "dasd"}), reward_fn=length_reward)
    model_device = next(trainer.model.parameters()).device
    handed = []

    def two_equal_processes(tensor):
        assert tensor.device == model_device, f"a collective got a tensor on {tensor.device}, not {model_device}"
        handed.append(tensor.numel() * tensor.element_size())
        tensor.mul_(2)  # the sum over two processes that computed the same

    def bypass(*args, **kwargs):
        raise AssertionError("torch.distributed.all_reduce called outside Collectives")

    monkeypatch.setattr(torch.distributed, "all_reduce", bypass)
    bucket = 64 * 2**10
    trainer.world = 2
    trainer.collectives = Collectives(trainer.device, 2, bucket_bytes=bucket, all_reduce=two_equal_processes)
    metrics = trainer.train_step()
    trainer.grader.close()
    assert not metrics["skipped"] and metrics["processes"] == 2
    grad_bytes = [p.numel() * p.element_size() for p in trainer.params]
    total = sum(grad_bytes)
    assert len(handed) >= 6  # counts, loss, names, diagnostics, metrics, and several gradient buckets
    assert max(handed) <= max(bucket, max(grad_bytes)) < total
    assert "entropy" in metrics and "teacher_entropy" in metrics  # the diagnostics, averaged over processes


def test_trainer_passes_the_step_so_reopold_switches_phase(tmp_path):
    from selfdistill.trainer import Trainer

    config = config_from_dict({
        "model": {"path": "tiny"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        "objective": {"name": "reopold", "switch_step": 1},
        "optim": {"steps": 2, "lr": 1e-3, "micro_batch_size": 4},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })
    trainer = Trainer(config)
    phases = [trainer.train_step()["reopold/phase"] for _ in range(2)]
    trainer.grader.close()
    assert phases == [1.0, 2.0]  # step 0 explores, step 1 (= switch_step) refines
