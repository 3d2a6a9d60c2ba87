"""Config loading and validation (selfdistill.config and the checks run when a config loads or the
trainer is built): every refusal names its key, before the first rollout."""

import warnings
from pathlib import Path

import pytest
import torch

from selfdistill.config import ConfigError, ModelConfig, ObjectiveConfig, config_from_dict, load_config, parse_overrides
from selfdistill.objectives import OBJECTIVES, KnobError, ObjectiveBatch
from selfdistill.prompts import PromptTooLongError
from selfdistill.tokenstats import TokenStats
from selfdistill.trainer import Trainer
from tests.helpers import FAMILY, length_reward, make_stats, tiny_config

REPO = Path(__file__).resolve().parents[1]


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


def test_shared_prefix_config_is_validated(tmp_path):
    from selfdistill.config import ConfigError, OptimConfig

    assert OptimConfig().shared_prefix is True
    assert tiny_config(tmp_path, optim={"shared_prefix": False}).optim.shared_prefix is False
    with pytest.raises(ConfigError, match="optim.shared_prefix"):
        tiny_config(tmp_path, optim={"shared_prefix": "yes"})
    with pytest.raises(ConfigError, match="optim.shared_prefix"):
        OptimConfig(shared_prefix=1)


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


BAD_KNOBS = [("rlrt", "eps_w", 1.5), ("rlrt", "lam", 2.0), ("vopd", "eps_low", -0.1), ("antisd", "beta", 1.0),
             ("antisd", "h_min", -1.0), ("antisd", "floor", 0.0), ("eopd", "h_threshold", -0.5),
             ("reopold", "lam", 1.0), ("reopold", "beta", 0.0), ("reopold", "switch_step", -1),
             ("pw_opsd", "w_min", 1.5), ("pw_opsd", "scale", 0.0), ("dasd", "scale_floor", -1.0),
             ("dasd", "push_signal", "bounded"), ("dasd", "push_beta", 1.0)]


@pytest.mark.parametrize("method,knob,value", BAD_KNOBS)
def test_bad_knobs_raise_errors_naming_the_knob(method, knob, value):
    stats, adv, mask = make_stats(9)
    with pytest.raises(KnobError, match=f"^{knob} ") as error:
        OBJECTIVES[method](ObjectiveBatch(stats=stats, mask=mask, group_adv=adv), **{knob: value})
    assert error.value.knob == knob
    with pytest.raises(ConfigError, match=rf"objective\.knobs\.{knob}\b"):
        config_from_dict({"objective": {"name": method, "knobs": {knob: value}}})


def test_every_family_knob_is_known_to_the_config_without_a_field():
    for method in FAMILY:
        defaults = OBJECTIVES[method].knob_defaults()
        assert defaults, method
        config = config_from_dict({"objective": {"name": method, "knobs": dict(defaults)}})
        assert config.objective.knobs == defaults


def test_knob_values_are_checked_when_the_config_is_loaded_not_at_step_one():
    with pytest.raises(ConfigError, match=r"objective\.knobs\.rho .*must lie in \[0, 1\], got 1.5"):
        load_config(REPO / "configs/tiny/dasd.yaml", ["objective.rho=1.5"])
    with pytest.raises(ConfigError, match=r"objective\.knobs\.g_min"):
        load_config(REPO / "configs/tiny/egrsd.yaml", ["objective.knobs.g_min=0"])
    config = load_config(REPO / "configs/tiny/dasd.yaml", ["objective.knobs.beta=0.5", "objective.rho=0.1"])
    assert config.objective.knobs == {"beta": 0.5, "rho": 0.1}
    assert parse_overrides(["objective.knobs.beta=0.5"]) == {"objective": {"knobs": {"beta": 0.5}}}
    with pytest.raises(ConfigError, match=r"objective\.divergence_\*: method 'eopd': .*needs top_k and beta = 0"):
        load_config(REPO / "configs/tiny/eopd.yaml", ["objective.divergence_beta=0.5"])
    with pytest.raises(ConfigError, match="objective.plugins: cannot import 'no_such_plugin_module'"):
        config_from_dict({"objective": {"plugins": ["no_such_plugin_module"]}})


def test_objective_name_is_the_field_and_method_a_deprecated_alias():
    # Regression (#25): `objective.name: dasd` was read as a knob called "name".
    assert config_from_dict({"objective": {"name": "opsd"}}).objective.name == "opsd"
    with pytest.warns(FutureWarning, match=r"objective\.method is deprecated: write objective\.name"):
        assert config_from_dict({"objective": {"method": "grpo"}}).objective.name == "grpo"
    with pytest.raises(ConfigError, match=r"objective\.name: set twice, to 'opsd' and as the deprecated "
                                          r"objective\.method to 'grpo'"):
        config_from_dict({"objective": {"name": "opsd", "method": "grpo"}})
    with pytest.warns(FutureWarning):  # an override of either spelling replaces the file's value of the other
        config = load_config(REPO / "configs/tiny/dasd.yaml", ["objective.method=opsd"])
    assert config.objective.name == "opsd" and config.objective.knobs == {}
    assert load_config(REPO / "configs/tiny/dasd.yaml", ["objective.name=grpo"]).objective.name == "grpo"


def test_model_dtype_takes_auto_and_names_the_key_otherwise():
    assert ModelConfig(dtype="auto").dtype == "auto"
    with pytest.raises(ConfigError, match="model.dtype: float32, bfloat16 or auto, got 'half'"):
        ModelConfig(dtype="half")


def test_strategy_is_validated_when_the_config_loads():
    from selfdistill.config import STRATEGIES, ConfigError, config_from_dict
    from selfdistill.parallel import STRATEGIES as BUILT

    assert set(STRATEGIES) == set(BUILT)
    assert config_from_dict({}).distributed.strategy == "ddp"
    with pytest.raises(ConfigError, match=r"distributed\.strategy.*ddp, fsdp2"):
        config_from_dict({"distributed": {"strategy": "zero3"}})
