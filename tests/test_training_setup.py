"""selfdistill.training_setup: bfloat16 compute with float32 master weights, LoRA set-ups, and the
launchers and heads the trainer refuses."""

import pytest
import torch

from selfdistill.config import ConfigError
from selfdistill.trainer import Trainer
from tests.helpers import length_reward, tiny_config


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


def test_lora_on_the_output_layer_is_refused(tmp_path):
    """The fused output layer uses the head's base weight: an adapter on it would never learn."""
    config = tiny_config(tmp_path, model={"lora_rank": 4, "lora_targets": ["q_proj", "lm_head"]})
    with pytest.raises(ConfigError, match=r"model.lora_targets: \['lm_head'\] is the output layer"):
        Trainer(config)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_launchers_are_refused(kind):
    """This trainer holds a full replica per process: under an FSDP or DeepSpeed launch it says so and points to
    the TRL route. (An FSDP / DeepSpeed launch needs GPUs; the accelerator's answer is stood in for.)"""
    from accelerate.utils import DistributedType

    from selfdistill.training_setup import refuse_sharding

    with pytest.raises(ConfigError, match=r"selfdistill\.integrations\.trl"):
        refuse_sharding(getattr(DistributedType, kind))
    refuse_sharding(DistributedType.MULTI_GPU)
