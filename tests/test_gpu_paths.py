"""The trainer's GPU path, checked on the CPU (issue #14): collectives on the accelerator's device, gradients
summed in bounded buckets, bfloat16 compute with float32 master weights and EMA, and the set-ups the trainer
cannot run refused before the first rollout."""

import warnings

import pytest
import torch
from test_trainer import length_reward, tiny_config

from selfdistill.collectives import Collectives
from selfdistill.config import ConfigError, ObjectiveConfig
from selfdistill.forward import check_output_layer
from selfdistill.models import build_tiny_model, build_tiny_tokenizer
from selfdistill.objectives import OBJECTIVES, ObjectiveBatch
from selfdistill.teacher import Teacher
from selfdistill.tokenstats import TokenStats
from selfdistill.trainer import Trainer

# ----------------------------------------------------------------------------------------------
# collectives


class _Handed(Exception):
    pass


def test_collectives_hand_the_collective_tensors_on_the_accelerator_device():
    """NCCL reduces only CUDA tensors: a CPU tensor (a count, the loss, the metrics) is moved to the accelerator's
    device before the collective. `meta` stands in for the GPU here; the stand-in collective records the device."""
    seen = []

    def collective(tensor):
        seen.append(tensor.device)
        raise _Handed  # a meta tensor has no values to hand back

    collectives = Collectives("meta", 2, all_reduce=collective)
    with pytest.raises(_Handed):
        collectives.sum(torch.ones(3))
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    with pytest.raises(_Handed):
        collectives.sum_gradients([param])
    assert seen == [torch.device("meta")] * 2


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


def test_weighted_means_sum_over_processes_and_refuse_different_names():
    other = torch.tensor([2.0, 8.0, 6.0, 2.0], dtype=torch.float64)  # the other process's values, then weights

    def with_the_other(tensor):
        tensor.add_(other if tensor.numel() == 4 else tensor.clone())  # the name check: the same names there

    collectives = Collectives("cpu", 2, all_reduce=with_the_other)
    means = collectives.weighted_means({"a": 4.0, "b": 0.0}, {"a": 2.0, "b": 0.0})  # this process: b unweighted
    assert means == {"a": (4.0 + 2.0) / (2.0 + 6.0), "b": (0.0 + 8.0) / (0.0 + 2.0)}

    def with_other_names(tensor):
        tensor.add_(tensor + 1)

    with pytest.raises(RuntimeError, match="the processes logged different diagnostics"):
        Collectives("cpu", 2, all_reduce=with_other_names).weighted_means({"a": 1.0}, {"a": 1.0})
    assert Collectives("cpu", 1).weighted_means({"a": 3.0, "z": 1.0}, {"a": 2.0, "z": 0.0}) == {"a": 1.5, "z": 0.0}


def test_gradient_buckets_are_bounded_and_sum_in_place():
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(5, 7), (300,), (3,), (40, 40), (2, 2)]]
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=generator)
    expected = [2 * p.grad.clone() if p.grad is not None else torch.zeros(p.shape) for p in params]
    handed = []

    def two_equal_processes(tensor):
        handed.append(tensor.numel())
        tensor.mul_(2)

    grads = [p.grad for p in params]
    Collectives("cpu", 2, bucket_bytes=400 * 4, all_reduce=two_equal_processes).sum_gradients(params)
    for p, want, grad in zip(params, expected, grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
        assert grad is None or p.grad is grad  # summed in place, not replaced
    assert max(handed) <= 40 * 40 and max(handed) < sum(p.numel() for p in params)
    assert sorted(handed) == sorted([35 + 300 + 3, 1600, 4])  # buckets of ≤ 400 floats; the large one alone


# ----------------------------------------------------------------------------------------------
# bfloat16


def test_adamw_on_bfloat16_weights_drops_most_updates():
    """The failure the trainer avoids (issue #14): a fused AdamW step at lr 1e-5 on bfloat16 weights of scale
    0.02 leaves most entries exactly where they were."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(256, 256, generator=generator) * 0.02).to(torch.bfloat16))
    before = weight.detach().clone()
    weight.grad = torch.randn(weight.shape, generator=generator).to(torch.bfloat16)
    torch.optim.AdamW([weight], lr=1e-5, fused=True).step()
    assert (weight.detach() == before).float().mean() > 0.5


def test_bfloat16_full_finetuning_keeps_float32_master_weights_and_moves_every_entry(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, model={"dtype": "bfloat16"}, objective={"name": "opsd"},
                                  optim={"lr": 1e-5}), reward_fn=length_reward)
    assert {p.dtype for p in trainer.params} == {torch.float32}
    compute = []
    layer = next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj"))
    layer.register_forward_hook(lambda module, args, out: compute.append(out.dtype))
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train_step()
    trainer.grader.close()
    assert not metrics["skipped"]
    assert compute and set(compute) == {torch.bfloat16}  # rollouts, teacher and student ran in bfloat16
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.params, before, strict=True))
    entries = sum(b.numel() for b in before)
    assert moved / entries > 0.99, f"only {moved / entries:.1%} of the entries moved"


def test_lora_under_bfloat16_holds_the_base_in_bfloat16_and_trains_float32_adapters(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, model={"dtype": "bfloat16", "lora_rank": 4,
                                                   "lora_targets": ["q_proj", "v_proj"]},
                                  objective={"name": "opsd"}, optim={"lr": 1e-2}), reward_fn=length_reward)
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in trainer.params} == {torch.float32}
    before = [p.detach().clone() for p in trainer.params]
    assert not trainer.train_step()["skipped"]
    trainer.grader.close()
    assert any(not torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True))


def test_ema_teacher_accumulates_in_float32():
    """With decay 0.99 a step moves the teacher by 1 % of the student's change; in bfloat16 that rounds away."""
    generator = torch.Generator().manual_seed(0)
    student = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.copy_(torch.randn(64, 64, generator=generator) * 0.02)
    teacher = Teacher("ema", student, ema_decay=0.99)
    assert teacher.copy.weight.dtype == torch.float32
    start = teacher.copy.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(student.weight.abs() * 0.05 + 1e-4)  # a small move of every entry
    teacher.update()
    want = start + 0.01 * (student.weight.float() - start)
    torch.testing.assert_close(teacher.copy.weight, want, rtol=1e-6, atol=1e-9)
    assert (teacher.copy.weight != start).float().mean() > 0.99


# ----------------------------------------------------------------------------------------------
# refused before the first rollout


def test_vllm_rollouts_in_training_are_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.backend.*selfdistill\.integrations\.trl"):
        tiny_config(tmp_path, rollout={"backend": "vllm"})


def test_dasd_divergence_validates_its_router():
    with pytest.raises(ConfigError, match=r"objective\.knobs\.router .*router must be one of"):
        ObjectiveConfig(name="dasd_divergence", knobs={"router": "student_entrpy"})
    B, T = 2, 3
    stats = TokenStats(*(torch.full((B, T), -0.5) for _ in range(5)))
    batch = ObjectiveBatch(stats=stats, mask=torch.ones(B, T), group_adv=torch.zeros(B))
    with pytest.raises(ValueError, match="router must be one of"):
        OBJECTIVES["dasd_divergence"](batch, router="student_entrpy")
    OBJECTIVES["dasd_divergence"](batch, router="teacher_entropy")  # the valid ones run


def test_lora_on_the_output_layer_is_refused(tmp_path):
    """The fused output layer uses the head's base weight: an adapter on it would never learn."""
    config = tiny_config(tmp_path, model={"lora_rank": 4, "lora_targets": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match=r"model.lora_targets: \['lm_head'\] is the output layer"):
        Trainer(config)


def test_scaled_output_heads_are_refused():
    from transformers import AutoModelForCausalLM, GraniteConfig

    tokenizer = build_tiny_tokenizer()
    granite = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0)
    with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
        check_output_layer(AutoModelForCausalLM.from_config(granite))
    granite.logits_scaling = 1.0
    check_output_layer(AutoModelForCausalLM.from_config(granite))  # a plain head passes

    # A scale that no known attribute names is found by the probe forward.
    model = build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    check_output_layer(model)
    plain_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_forward
    with pytest.raises(NotImplementedError, match="logits differ from h @ W.T"):
        check_output_layer(model)


def test_group_size_one_is_refused_where_every_update_would_be_zero(tmp_path):
    with pytest.raises(ConfigError, match="rollout.group_size: 1 makes every group advantage 0"):
        tiny_config(tmp_path, rollout={"group_size": 1}, objective={"name": "grpo"})
    with pytest.raises(ConfigError, match="rollout.group_size"):
        tiny_config(tmp_path, rollout={"group_size": 1}, objective={"name": "rlsd"})
    with pytest.warns(UserWarning, match="the reward plays no role"):
        tiny_config(tmp_path, rollout={"group_size": 1}, objective={"name": "dasd"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_config(tmp_path, rollout={"group_size": 1}, objective={"name": "opsd"})  # no advantage used


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_launchers_are_refused(kind):
    """This trainer holds a full replica per process: under an FSDP or DeepSpeed launch it says so and points to
    the TRL route. (An FSDP / DeepSpeed launch needs GPUs; the accelerator's answer is stood in for.)"""
    from accelerate.utils import DistributedType

    from selfdistill.training_setup import refuse_sharding

    with pytest.raises(ConfigError, match=r"selfdistill\.integrations\.trl"):
        refuse_sharding(getattr(DistributedType, kind))
    refuse_sharding(DistributedType.MULTI_GPU)
