"""`selfdistill.precision`: `model.dtype` resolved on the device, `auto` by the hardware's native bfloat16."""

from __future__ import annotations

import pytest
import torch

from selfdistill.precision import compute_dtype, cpu_flags, cpu_has_bf16

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\nbogomips\t: 4890.85\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_cpu_flags_read_the_flags_line():
    assert cpu_flags(ZEN3) == {"fpu", "sse", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags("model name : x\n") == set()
    assert not cpu_has_bf16(ZEN3)
    assert cpu_has_bf16(SAPPHIRE_RAPIDS) and cpu_has_bf16(ZEN4)


def test_compute_dtype_of_each_name():
    cpu = torch.device("cpu")
    assert compute_dtype("float32", cpu) is torch.float32
    assert compute_dtype("bfloat16", cpu) is torch.bfloat16
    assert compute_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_bf16() else torch.float32)  # this machine
    with pytest.raises(ValueError, match="model.dtype: one of float32, bfloat16, auto, got 'fp16'"):
        compute_dtype("fp16", cpu)


def test_auto_on_a_cpu_follows_its_flags(monkeypatch):
    import selfdistill.precision as precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: cpu_flags(ZEN3))
    assert compute_dtype("auto", cpu) is torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: cpu_flags(SAPPHIRE_RAPIDS))
    assert compute_dtype("auto", cpu) is torch.bfloat16


def test_a_run_with_auto_trains_in_the_resolved_dtype(tmp_path, capsys):
    from selfdistill.config import config_from_dict
    from selfdistill.trainer import Trainer

    config = config_from_dict({
        "model": {"path": "tiny", "dtype": "auto"},
        "data": {"dataset": "synthetic:operation_chains", "num_problems": 4},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        "objective": {"name": "dasd"},
        "logging": {"output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })
    trainer = Trainer(config, reward_fn=lambda texts, problems: [(len(t) % 3) / 2 for t in texts])
    resolved = compute_dtype("auto", torch.device("cpu"))
    assert trainer.compute_dtype is resolved
    assert f"model.dtype auto: {str(resolved).removeprefix('torch.')} compute on cpu" in capsys.readouterr().out
    assert all(p.dtype is torch.float32 for p in trainer.params)  # master weights stay float32
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    trainer.grader.close()
