"""The trainer on the built-in tiny model: every method updates it, teachers behave, runs resume exactly."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.config import ConfigError, config_from_dict, load_config
from selfdistill.objectives import OBJECTIVES
from selfdistill.prompts import PromptTooLongError
from selfdistill.trainer import Trainer, resume

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **sections):
    values = {
        "model": {"path": "tiny"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12},
        "optim": {"steps": 1, "lr": 1e-3, "micro_batch_size": 3, "chunk_tokens": 24},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return config_from_dict(values)


def length_reward(completions, problems):
    """A reward that varies within a group even for an untrained model (math rewards would all be 0)."""
    return [(len(text) % 5) / 4 for text in completions]


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


def test_misconfigured_runs_fail_before_the_first_rollout(tmp_path):
    with pytest.raises(PromptTooLongError, match=r"over the limit of 8 \(max_prompt_tokens\)"):
        Trainer(tiny_config(tmp_path, data={"max_prompt_tokens": 8}))
    with pytest.raises(ConfigError, match="objective.rho"):
        tiny_config(tmp_path, objective={"name": "grpo", "rho": 0.1})
    with pytest.raises(ConfigError, match="optim.stepz: unknown key"):
        tiny_config(tmp_path, optim={"stepz": 3})
    with pytest.raises(ConfigError, match="data.dataset"):
        Trainer(tiny_config(tmp_path, data={"dataset": "no/such/file.jsonl"}))


def test_shipped_configs_load(tmp_path):
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 18
    for path in configs:
        load_config(path)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = sorted(run_dir.glob("checkpoint-*"))[-1]
    return load_file(str(checkpoint / "model.safetensors"))


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


def test_two_processes_with_half_the_batch_each_match_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (torchrun + gloo): the same update as
    one process with the whole batch."""
    args = ["model.path=tiny", "data.dataset=synthetic:operation_chains", "data.num_problems=8",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=12", "optim.steps=1",
            "optim.lr=1e-3", "objective.name=opsd", "logging.progress=false", "logging.tensorboard=false"]
    # opsd: a smooth loss. (DASD's router divides by the spread of the entropies, which is ~1e-4 for an
    # untrained model, so padding-level float differences between the two layouts get amplified.)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate runs several CPU processes through torchrun when asked for --multi_gpu (gloo backend)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "selfdistill", "train"]
    two = subprocess.run([*launch, *args, f"logging.output_dir={tmp_path / 'two'}"], capture_output=True, text=True,
                         env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    single = [sys.executable, "-m", "selfdistill", "train"]
    one = subprocess.run([*single, *args, f"logging.output_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
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
