"""`distributed.strategy: fsdp2` on the CPU (gloo): two sharded processes make the same updates as one whole
process on the same rollouts, no process ever holds a trained tensor whole, the fused output layer keeps its
hand-written gradient, and sharded checkpoints resume with another number of processes.

The runs go through tests/sharded_worker.py: one process samples and records its rollouts, the sharded runs replay
them (sampling alone would part the runs once a rounding difference flips a token; see the worker's docstring).

Tolerances (float32). The two layouts differ before any sharding: one process packs all 8 rows of a step into
micro-batches of 3, each of two processes packs its 4, so padding widths and summation orders differ, and a DDP
run with two processes differs from one process by as much. Losses agree to 1e-5 relative or 1e-7 absolute (grpo's
loss is a sum of terms of both signs; dasd: 5e-5 absolute on losses of 1e-4 to 7e-2, as its router divides by the
spread of the token entropies, ~1e-4 for an untrained model: DDP's two processes differ from one by 6e-6 over 3
updates, and by 1.7e-5 at the 4th update of 2 PPO epochs x 2 mini-batches, where FSDP2's differ by 2.4e-5), gradient
norms to 2e-5 relative. Weights after each update (lr 1e-3): opsd, grpo, the EMA teacher and LoRA within 1e-5
everywhere; dasd and its live teacher within 1e-5 on all but 1e-3 of the entries, and everywhere within the 2·lr
per update that AdamW's bounded steps allow: its first steps divide by |g| + 1e-8, so an entry whose gradient is
~1e-9 moves by a fraction of lr, of either sign, that follows float noise. Which entries do depends on DASD's knobs:
with beta 0.03 and the floor 0.1 the largest gap at update 0 was 0.2·lr, with today's defaults (beta 0.01, no
floor) 0.3·lr and 1.4·lr in `dasd_ppo`, with beta 0.01 and the floor 0.9·lr (measured on one AVX-512 machine).
A sharding mistake moves most entries, which the 1e-3 share catches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sharded_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LR = 1e-3


def run(argv: list[str], *, processes: int) -> None:
    launch = TORCHRUN if processes == 2 else [sys.executable]
    proc = subprocess.run([*launch, *argv], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def updates(folder: Path, case: str) -> list[dict]:
    return torch.load(folder / f"{case}.pt", weights_only=False)["updates"]


def assert_same_updates(one: list[dict], two: list[dict], case: str) -> None:
    """Loss, gradient norm and gathered weights of every update (and the EMA teacher's after each step) agree within
    the tolerances of the module docstring."""
    assert len(one) == len(two) >= 3, (len(one), len(two))
    noisy = case.startswith("dasd")
    for k, (a, b) in enumerate(zip(one, two, strict=True)):
        where = f"{case}, update {k}"
        assert not a["skipped"] and not b["skipped"], where
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=5e-5 if noisy else 1e-7), where
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-5), where
        for part in ("weights", "teacher"):
            if part not in a:
                continue
            assert a[part].keys() == b[part].keys(), where
            off = total = 0
            for name, whole in a[part].items():
                gap = (whole - b[part][name]).abs()  # [shape of the tensor]
                bound = 2 * LR * (k + 1) if noisy else 1e-5
                assert float(gap.max()) <= bound, f"{where}: {part} {name} {float(gap.max())}"
                off += int((gap > 1e-5).sum())
                total += gap.numel()
            assert off <= 1e-3 * total, f"{where}: {part}: {off} of {total} entries differ by more than 1e-5"
    moved = [n for n, w in two[-1]["weights"].items() if not torch.equal(w, two[0]["weights"][n])]
    assert moved, f"{case}: the weights did not move"


def compare(tmp_path: Path, cases: list[str]) -> None:
    names = ",".join(cases)
    run([str(WORKER), "--out", str(tmp_path / "one"), "--record", str(tmp_path / "replay"), "--cases", names],
        processes=1)
    run([str(WORKER), "--out", str(tmp_path / "two"), "--replay", str(tmp_path / "replay"), "--cases", names,
         "--strategy", "fsdp2", "--check-shards"], processes=2)
    for case in cases:
        violations = [v for rank in (0, 1)
                      for v in json.loads((tmp_path / "two" / f"{case}.violations.{rank}.json").read_text())]
        assert not violations, violations[:5]
        one, two = updates(tmp_path / "one", case), updates(tmp_path / "two", case)
        assert_same_updates(one, two, case)


def test_two_fsdp2_processes_equal_one_process_for_dasd_opsd_grpo(tmp_path):
    """3 updates of dasd and opsd (frozen teacher, opsd's full-vocabulary JSD through the fused output layer) and 3
    steps of grpo with 2 PPO epochs x 2 mini-batches (the scoring pass): the same as one process; and no parameter,
    gradient or AdamW tensor is ever whole on a process (local sizes checked before and after every step)."""
    compare(tmp_path, ["dasd", "opsd", "grpo"])


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process_with_ema_live_teachers_lora_untied_head_and_scoring(tmp_path):
    """The teachers sharded as the student: EMA (averaged shard by shard; its gathered weights compared too),
    live (the student itself), and LoRA under FSDP2 with the frozen teacher being the base (adapters off); an
    untied output layer (its own FSDP unit, gathered for the fused pass, its gradient reduce-scattered); dasd with
    2 PPO epochs x 2 mini-batches (the scoring pass keeps the sharded teacher's output weight for the updates);
    opsd with activation recomputation (model.gradient_checkpointing: the layers re-gathered in backward)."""
    compare(tmp_path, ["opsd_ema", "dasd_live", "opsd_lora", "opsd_untied", "dasd_ppo", "opsd_recompute"])


@pytest.mark.slow
def test_sharded_checkpoint_of_two_processes_resumes_with_one_and_with_two(tmp_path):
    """A checkpoint written by 2 sharded processes at step 1 (weights, AdamW state, EMA teacher, schedule),
    resumed by 2 and by 1 process, continues as the uninterrupted run: bit for bit with 2, within the module's
    tolerances with 1."""
    case = "opsd_ema"
    run([str(WORKER), "--out", str(tmp_path / "one"), "--record", str(tmp_path / "replay"), "--cases", case],
        processes=1)
    straight = tmp_path / "straight"
    run([str(WORKER), "--out", str(straight), "--replay", str(tmp_path / "replay"), "--cases", case,
         "--strategy", "fsdp2", "--checkpoint-every", "1"], processes=2)
    checkpoint = straight / case / "checkpoint-000001"
    assert (checkpoint / "COMPLETE").exists() and (checkpoint / "sharded").is_dir()
    uninterrupted = updates(straight, case)
    for processes in (2, 1):
        out = tmp_path / f"resumed{processes}"
        run([str(WORKER), "--out", str(out), "--replay", str(tmp_path / "replay"), "--cases", case,
             "--strategy", "fsdp2", "--resume", str(checkpoint)], processes=processes)
        resumed = updates(out, case)
        assert [u["step"] for u in resumed] == [1, 2]
        for a, b in zip(uninterrupted[1:], resumed, strict=True):
            for part in ("weights", "teacher"):
                for name, whole in a[part].items():
                    if processes == 2:
                        assert torch.equal(whole, b[part][name]), (processes, part, name)
                    else:
                        torch.testing.assert_close(b[part][name], whole, rtol=0, atol=1e-5, msg=name)
            assert b["loss"] == pytest.approx(a["loss"], rel=0 if processes == 2 else 1e-5, abs=1e-8)
        steps = [json.loads(line)["step"] for line in (out / case / "metrics.jsonl").read_text().splitlines()]
        assert steps == [2, 3]


def test_fsdp2_config_trains_under_torchrun_and_exports_a_model_eval_loads(tmp_path, data_root):
    """The shipped tiny config with `distributed.strategy=fsdp2` under `torchrun --nproc_per_node 2`: trains, writes
    a sharded checkpoint plus a Hugging Face folder, and `selfdistill eval --model <checkpoint>` opens it."""
    run_dir = tmp_path / "run"
    run(["-m", "selfdistill", "train", "--config", str(REPO / "configs/tiny/dasd.yaml"), "distributed.strategy=fsdp2",
         "optim.steps=2", "rollout.max_new_tokens=12", f"logging.output_dir={run_dir}", "logging.progress=false",
         "logging.tensorboard=false"], processes=2)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["processes"] for m in metrics] == [2, 2] and all(m["skipped"] == 0 for m in metrics)
    checkpoint = run_dir / "checkpoint-000002"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from selfdistill.models import load_model

    model, _ = load_model(str(checkpoint))
    initial, _ = load_model("tiny")
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in initial.named_parameters())
    eval_out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "selfdistill", "eval", "--model", str(checkpoint), "--benchmarks",
                           "gsm8k", "--limit", "2", "--n", "1", "--max-new-tokens", "8", "--data-root", str(data_root),
                           "--out", str(eval_out), "--no-progress"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (eval_out / "samples.jsonl").read_text().strip()


def test_sharded_packing_always_makes_both_decoder_calls():
    """Under fsdp2 every decoder call is a collective, so a micro-batch of one-token responses must still make the
    shared-prefix forward's two calls (prompts, then responses) like the other processes' micro-batches: the
    responses are padded to 2 masked columns, with the same hidden state at the real one."""
    from selfdistill.forward import pack_shared, response_hidden_states
    from selfdistill.models import load_model
    from selfdistill.training_setup import choose_packing

    model, _ = load_model("tiny")
    model.eval()
    student, teacher = choose_packing(model, shared_prefix=True, has_teacher=True, sharded=True)
    prompts, responses = [[5, 6, 7], [5, 6, 7]], [[9], [11]]
    padded = student(prompts, responses, pad_id=0)
    assert padded.response_mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        wide = response_hidden_states(model, padded)  # [2,2,d]
        assert len(calls) == 2
        narrow = response_hidden_states(model, pack_shared(prompts, responses, pad_id=0))  # [2,1,d]
    hook.remove()
    assert len(calls) == 3  # the unpadded batch of one-token responses makes one call only
    torch.testing.assert_close(wide[:, :1], narrow)
    assert teacher.keywords == {"min_response_width": 2}


def test_teacher_copy_for_sharding_holds_no_weights_and_keeps_ties_buffers_and_grad_flags():
    """fsdp2's teacher copy is made on the meta device (no memory): every parameter on meta, the tied embedding /
    output matrix still one parameter, buffers (rotary frequencies) copied with their values, the student's
    tensors untouched. (Its shards filled from the student's are checked by the equality tests above: a frozen or
    EMA teacher with wrong values would change dasd's and opsd's losses.)"""
    from selfdistill.models import load_model
    from selfdistill.parallel import FullyShardedParallel

    model, _ = load_model("tiny")
    model.lm_head.weight.requires_grad_(False)
    copy = FullyShardedParallel.copy_model(model)
    assert all(p.is_meta for p in copy.parameters())
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert [(n, p.shape, p.requires_grad) for n, p in copy.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    assert buffers, "the tiny model has rotary buffers"
    for name, b in copy.named_buffers():
        assert not b.is_meta and torch.equal(b, buffers[name]) and b.data_ptr() != buffers[name].data_ptr()
    assert not any(p.is_meta for p in model.parameters())
