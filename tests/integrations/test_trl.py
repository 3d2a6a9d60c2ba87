"""The TRL route (selfdistill.integrations.trl) through TRL's own GRPOTrainer, on the built-in tiny model."""

import math
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402

from selfdistill.config import ConfigError  # noqa: E402
from selfdistill.data import operation_chains  # noqa: E402
from selfdistill.integrations.trl import (  # noqa: E402
    EMA_TEACHER_FILE,
    BoxedAnswerReward,
    FullLogitsWarning,
    SelfDistillConfig,
    SelfDistillTrainer,
    problems_to_dataset,
)
from selfdistill.models import load_model, tiny_model_dir  # noqa: E402
from selfdistill.objectives import OBJECTIVES, ObjectiveBatch, aggregate  # noqa: E402
from selfdistill.prompts import PromptTooLongError  # noqa: E402
from selfdistill.tokenstats import naive_token_stats  # noqa: E402

G = 4  # completions per prompt


def length_reward(prompts, completions, **kwargs):
    """Varies within a group even for an untrained model (math rewards would all be 0)."""
    return [float(len(c[-1]["content"]) % 5) / 4 for c in completions]


def tiny_rows(n=8, seed=0):
    return problems_to_dataset(operation_chains(n, seed=seed))


def make_trainer(tmp_path, method="dasd", rows=None, peft_config=None, model=None, trainer_kwargs=None, **overrides):
    _, tokenizer = load_model("tiny")
    values = dict(
        output_dir=str(tmp_path / "out"), objective=method, objective_args={"teacher": "frozen"},
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=G,
        max_completion_length=8, learning_rate=1e-2, max_steps=3, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, bf16=False, gradient_checkpointing=False,
    )
    values.update(overrides)
    args = SelfDistillConfig(**values)
    dataset = Dataset.from_list(rows if rows is not None else tiny_rows())
    return SelfDistillTrainer(model=model if model is not None else str(tiny_model_dir()), reward_funcs=[length_reward],
                              args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                              **(trainer_kwargs or {}))


def one_batch(trainer, rows):
    """A generation batch as TRL makes it: each row repeated G times, prompt-major."""
    trainer.model.train()
    with torch.no_grad():
        return trainer._generate_and_score_completions([row for row in rows for _ in range(G)])


# ----------------------------------------------------------------------------------------------
# end to end, through TRL's train()


EXPECTED_DIAGNOSTICS = {
    "dasd": ["dasd/push_fraction", "dasd/pull_fraction", "teacher_entropy", "clip_fraction"],
    "dasd_divergence": ["dasd/push_fraction", "divergence", "teacher_entropy"],
    "egrsd": ["egrsd/gate_mean", "teacher_entropy"],
    "opsd": ["divergence", "teacher_entropy"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(EXPECTED_DIAGNOSTICS))
def test_three_steps_end_to_end(tmp_path, method):
    trainer = make_trainer(tmp_path, method)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    for name in EXPECTED_DIAGNOSTICS[method]:
        assert all(name in entry and math.isfinite(entry[name]) for entry in logs), (name, logs[-1])
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter moved"
    if method == "dasd":  # the router splits the tokens: pulled + pushed + neither = 1
        assert all(e["dasd/pull_fraction"] > 0 and e["dasd/pull_fraction"] + e["dasd/push_fraction"] <= 1 + 1e-6
                   for e in logs)


@pytest.mark.slow
def test_num_iterations_two_makes_the_clip_act(tmp_path):
    """With two updates per rollout batch TRL keeps the behaviour log-probs; the second update's ratio departs
    from 1 and the clip cuts some tokens (with one update per batch it never does)."""
    trainer = make_trainer(tmp_path, "dasd", num_iterations=2, max_steps=4, learning_rate=5e-2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert max(entry["clip_fraction"] for entry in logs) > 0


# ----------------------------------------------------------------------------------------------
# the loss inside the TRL path is the registry's loss on the same statistics


@pytest.mark.parametrize("method", ["dasd", *(pytest.param(m, marks=pytest.mark.slow)
                                             for m in ("dasd_divergence", "egrsd", "opsd", "rlsd", "grpo"))])
def test_per_token_loss_equals_the_registry(tmp_path, method):
    trainer = make_trainer(tmp_path, method)
    assert trainer.full_logits_reason is None  # the tiny model's head is plain h @ W.T: the fused path
    rows = tiny_rows(2)
    inputs = one_batch(trainer, rows)
    terms = trainer.objective_terms(trainer.model, inputs)
    stats, mask = terms.stats, terms.mask

    # The same statistics computed independently: a plain forward over whole sequences, the textbook formulas.
    model = trainer.model
    T = inputs["completion_ids"].shape[1]

    def logits_of(prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids, inputs["completion_ids"]], dim=1)  # [B,P+T]
        attention = torch.cat([prompt_mask, inputs["completion_mask"]], dim=1)  # [B,P+T]
        return model(input_ids=ids, attention_mask=attention).logits[:, -T - 1 : -1]  # [B,T,V]

    with torch.no_grad():
        student = logits_of(inputs["prompt_ids"], inputs["prompt_mask"])  # [B,T,V]
        teacher = None
        if OBJECTIVES[method].needs_teacher:
            teacher = logits_of(inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"])  # [B,T,V]
        reference = naive_token_stats(student, inputs["completion_ids"], temperature=trainer.temperature,
                                      teacher_logits=teacher, divergence=trainer.divergence)
    expected_mask = inputs["completion_mask"].float()
    batch = ObjectiveBatch(stats=reference, mask=expected_mask, group_adv=inputs["advantages"].float())
    expected, _ = OBJECTIVES[method](batch)
    assert torch.equal(mask, expected_mask)
    # the per-token loss of the route's statistics, and the loss the route reduced from it
    per_token, _ = OBJECTIVES[method](ObjectiveBatch(stats=stats, mask=mask, group_adv=batch.group_adv))
    assert per_token.shape == expected.shape == inputs["completion_ids"].shape
    assert (per_token - expected).abs().max() <= 1e-5
    expected_loss = (expected * trainer._loss_weights(inputs, expected_mask)).sum()
    assert abs(float(terms.loss.detach()) - float(expected_loss)) <= 1e-5 * max(1.0, abs(float(expected_loss)))
    assert (stats.logp - reference.logp).abs().max() <= 1e-5
    if teacher is not None:
        assert (stats.teacher_logp - reference.teacher_logp).abs().max() <= 1e-5
        # the teacher really saw other prompts than the student
        assert not torch.equal(inputs["teacher_prompt_ids"][:, -3:], inputs["prompt_ids"][:, -3:]) or \
            inputs["teacher_prompt_ids"].shape != inputs["prompt_ids"].shape

    # and the same statistics, loss and gradient as the full-logits path (the route before hidden states)
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation
    grads, losses = [], []
    for full_logits in (False, True):
        trainer.model.zero_grad()
        terms = trainer.objective_terms(trainer.model, inputs, full_logits=full_logits)
        terms.loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        losses.append(float(terms.loss.detach()))
        assert (terms.stats.logp - stats.logp).abs().max() <= 1e-5
    assert abs(losses[0] - losses[1]) <= 1e-6
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-5, rtol=1e-4), name


def test_the_fused_route_never_forms_full_logits(tmp_path):
    """Every tensor an op makes while the route computes the loss and its gradient, forward and backward: none with
    the vocabulary as its last dimension covers more positions than the fused path's workspace (five buffers of
    one block's positions, here one row), except views of the output weight; the full-logits path, watched the
    same way, does form `[B,T,V]` (so the watch can see it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    trainer = make_trainer(tmp_path, "opsd", max_completion_length=32, fused_chunk_tokens=32)
    inputs = one_batch(trainer, tiny_rows(2))
    B, T = inputs["completion_ids"].shape
    weight = trainer.model.get_output_embeddings().weight
    V = weight.shape[0]
    assert weight.shape[1] < B * T  # [d,V] views would otherwise look like d positions of logits

    class Widest(TorchDispatchMode):
        positions = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == V and \
                        t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
                    Widest.positions = max(Widest.positions, t.numel() // V)
            return out

    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation
    widest = {}
    for full_logits in (False, True):
        Widest.positions = 0
        with Widest():
            trainer.objective_terms(trainer.model, inputs, full_logits=full_logits).loss.backward()
        widest[full_logits] = Widest.positions
    assert widest[False] <= 5 * T < B * T, widest
    assert widest[True] >= B * T, widest


def test_a_head_that_is_not_plain_takes_the_full_logits_path_with_a_warning(tmp_path):
    model, _ = load_model(str(tiny_model_dir()))
    model.config.final_logit_softcapping = 30.0  # refused by name by check_output_layer
    with pytest.warns(FullLogitsWarning, match="final_logit_softcapping"):
        trainer = make_trainer(tmp_path, "dasd", model=model, max_steps=1)
    assert "final_logit_softcapping" in trainer.full_logits_reason
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])


def registry_per_token(trainer, terms, inputs):
    """The per-token loss `[B,T]` of the route's statistics, from the registry's method."""
    batch = ObjectiveBatch(stats=terms.stats, mask=terms.mask, group_adv=inputs["advantages"].float(),
                           old_logp=inputs.get("old_per_token_logps"))
    return trainer.objective(batch, **trainer.objective_knobs)[0]


@pytest.mark.slow
def test_micro_batch_losses_sum_to_the_aggregate_of_the_step(tmp_path):
    """Under gradient accumulation the micro-batch losses add up to `aggregate` over the whole step."""
    trainer = make_trainer(tmp_path, "dasd")
    inputs = one_batch(trainer, tiny_rows(2))  # 8 rows = 2 micro-batches of 4 (steps_per_generation = 2)
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        terms = trainer.objective_terms(trainer.model, inputs)
        whole = aggregate(registry_per_token(trainer, terms, inputs), terms.mask, mode="token-mean")
        halves = []
        for rows in (slice(0, 4), slice(4, 8)):
            part = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
            halves.append(trainer._compute_loss(trainer.model, part))
    assert float(inputs["num_items_in_batch"]) == float(terms.mask.sum())
    assert abs(float(sum(halves)) - float(whole)) <= 1e-6


def test_two_optimizer_steps_per_generation_batch_are_each_normalized_by_their_own_tokens(tmp_path):
    """steps_per_generation = 4, gradient_accumulation_steps = 2: each optimizer step's two micro-batch losses add
    up to `aggregate` over exactly those two micro-batches (their own token count, not half the batch's)."""
    trainer = make_trainer(tmp_path, "dasd", steps_per_generation=4, max_completion_length=16)
    generation_batch = [row for row in tiny_rows(4) for _ in range(G)]  # 16 rows: 4 micro-batches of 4
    trainer.model.train()
    micro_batches = []
    for step in range(4):  # as TRL's training_step advances it
        trainer._step = step
        micro_batches.append(trainer._prepare_inputs(generation_batch))
    trainer.current_gradient_accumulation_steps = 2
    counts = []
    with torch.no_grad():
        for first in (0, 2):
            pair = micro_batches[first : first + 2]
            terms = [trainer.objective_terms(trainer.model, inputs) for inputs in pair]
            mask = torch.cat([t.mask for t in terms])
            per_token = [registry_per_token(trainer, t, inputs) for t, inputs in zip(terms, pair, strict=True)]
            whole = aggregate(torch.cat(per_token), mask, mode="token-mean")
            assert abs(float(sum(t.loss for t in terms)) - float(whole)) <= 1e-6
            assert all(float(inputs["step_tokens"]) == float(mask.sum()) for inputs in pair)
            counts.append(float(mask.sum()))
    assert sum(counts) == float(micro_batches[0]["num_items_in_batch"])


# ----------------------------------------------------------------------------------------------
# teachers and teacher prompts


def test_lora_frozen_teacher_is_the_base_model_without_a_copy(tmp_path):
    from peft import LoraConfig

    # init_lora_weights=False: the adapter changes the outputs from the start, so a teacher that kept it would differ
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    trainer = make_trainer(tmp_path, "dasd", peft_config=lora)
    assert trainer.teacher_model is None and trainer._teacher_is_base
    inputs = one_batch(trainer, tiny_rows(1))
    base, _ = load_model(str(tiny_model_dir()))
    args = (inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"], inputs["completion_ids"],
            inputs["completion_mask"])
    with torch.no_grad():
        with trainer._teacher(trainer.model) as teacher:
            teacher_logits = trainer._response_logits(teacher, *args)
        base_logits = trainer._response_logits(base, *args)
        student_logits = trainer._response_logits(trainer.model, *args)
    assert (teacher_logits - base_logits).abs().max() <= 1e-5
    assert (student_logits - base_logits).abs().max() > 1e-3  # the adapter is live for the student
    assert trainer.model.training  # the teacher pass gave the mode back


@pytest.mark.slow
def test_frozen_full_teacher_is_a_separate_copy_that_stays(tmp_path):
    trainer = make_trainer(tmp_path, "dasd", max_steps=1)
    assert trainer.teacher_model is not None and trainer.teacher_model is not trainer.model
    initial = {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, initial[n]) for n, p in trainer.teacher_model.named_parameters())
    assert not all(p.requires_grad for p in trainer.teacher_model.parameters())


@pytest.mark.slow
def test_live_teacher_is_the_current_student_without_gradient(tmp_path):
    trainer = make_trainer(tmp_path, "dasd", objective_args={"teacher": "live"})
    assert trainer.teacher_model is None and not trainer._teacher_is_base
    inputs = one_batch(trainer, tiny_rows(1))
    args = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
    with torch.no_grad():
        student = trainer._response_logits(trainer.model, *args)
        with trainer._teacher(trainer.model) as teacher:
            assert teacher is trainer.model and not teacher.training
            live = trainer._response_logits(teacher, *args)
    assert torch.allclose(live, student, atol=1e-6)


@pytest.mark.slow
def test_ema_teacher_moves_toward_the_student_by_one_minus_decay(tmp_path):
    trainer = make_trainer(tmp_path, "dasd", max_steps=1, objective_args={"teacher": "ema", "ema_decay": 0.5})
    initial = {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    student = dict(trainer.model.named_parameters())
    for name, teacher in trainer.teacher_model.named_parameters():
        expected = 0.5 * initial[name] + 0.5 * student[name].detach()
        assert torch.allclose(teacher, expected, atol=1e-6), name
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.teacher_model.named_parameters())


@pytest.mark.slow
def test_a_resumed_ema_run_repeats_the_uninterrupted_one(tmp_path):
    """Stopped after step 2 and resumed from its checkpoint: the same losses at steps 3-4 and the same EMA teacher
    (float32 average included) as a run of four steps straight through."""
    settings = dict(max_steps=4, objective_args={"teacher": "ema", "ema_decay": 0.5}, save_strategy="steps",
                    save_steps=2, learning_rate=5e-2)
    straight = make_trainer(tmp_path / "straight", "dasd", **settings)
    straight.train()
    from transformers import TrainerCallback

    class StopAfterTwo(TrainerCallback):  # an interruption: the schedule still runs to max_steps = 4
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    stopped = make_trainer(tmp_path / "stopped", "dasd", **settings)
    stopped.add_callback(StopAfterTwo())
    stopped.train()
    assert stopped.state.global_step == 2
    checkpoint = tmp_path / "stopped" / "out" / "checkpoint-2"
    assert (checkpoint / EMA_TEACHER_FILE).is_file()
    resumed = make_trainer(tmp_path / "stopped", "dasd", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def losses(trainer):
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    assert sorted(losses(resumed)) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's trainer state
    for step in (3, 4):
        assert losses(resumed)[step] == pytest.approx(losses(straight)[step], abs=1e-6), step
    resumed_teacher = dict(resumed.teacher_model.named_parameters())
    for name, param in straight.teacher_model.named_parameters():
        assert torch.allclose(param, resumed_teacher[name], atol=1e-6), name
    for name, average in straight.ema_average().average.items():
        assert torch.allclose(average, resumed.ema_average().average[name], atol=1e-6), name


@pytest.mark.slow
def test_resuming_an_ema_run_without_its_average_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path, "dasd", max_steps=1, objective_args={"teacher": "ema"}, save_strategy="steps",
                           save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    (checkpoint / EMA_TEACHER_FILE).unlink()
    resumed = make_trainer(tmp_path, "dasd", max_steps=2, objective_args={"teacher": "ema"})
    with pytest.raises(FileNotFoundError, match=EMA_TEACHER_FILE):
        resumed.train(resume_from_checkpoint=str(checkpoint))


# ----------------------------------------------------------------------------------------------
# the step the objective sees


@pytest.mark.slow
def test_reopold_switches_phase_at_switch_step_through_train(tmp_path):
    """REOPOLD's phase II starts once `switch_step` rollout batches are done; with num_iterations = 2 each rollout
    batch takes two optimizer steps, so the phase logged at optimizer steps 1-4 is 1, 1, 2, 2."""
    trainer = make_trainer(tmp_path, "reopold", objective_args={"teacher": "frozen", "switch_step": 1},
                           num_iterations=2, max_steps=4)
    trainer.train()
    phases = [e["reopold/phase"] for e in trainer.state.log_history if "loss" in e]
    assert phases == [1.0, 1.0, 2.0, 2.0]


def test_a_long_privileged_context_is_never_cut(tmp_path):
    rows = tiny_rows(2)
    long_context = " ".join(f"step {i}: 12 + {i} = {12 + i}." for i in range(60)) + " FINAL-MARK"
    rows[0]["privileged_context"] = long_context
    trainer = make_trainer(tmp_path, "dasd", rows=rows)
    tokenizer = trainer.processing_class
    ids = trainer.teacher_prompt_ids(rows)
    messages = trainer.teacher_prompt(rows[0])
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids[0] == list(full["input_ids"])
    assert len(ids[0]) > 1000  # longer than any student prompt here, and kept whole
    assert "FINAL-MARK" in tokenizer.decode(ids[0]) and rows[0]["problem"] in tokenizer.decode(ids[0])
    inputs = one_batch(trainer, rows[:1])
    assert int(inputs["teacher_prompt_mask"][0].sum()) == len(ids[0])


def test_a_teacher_prompt_over_the_limit_fails_before_training_with_the_numbers(tmp_path):
    rows = tiny_rows(2)
    rows[1]["privileged_context"] = "word " * 400
    with pytest.raises(PromptTooLongError, match=r"row 1 is \d+ tokens, over the limit of 300"):
        make_trainer(tmp_path, "dasd", rows=rows, max_teacher_prompt_length=300)


def test_teacher_prompt_uses_the_template_and_the_context_column(tmp_path):
    trainer = make_trainer(tmp_path, "dasd")
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Problem: 2+2?"}],
           "solution": "2+2=4", "answer": "4"}
    messages = trainer.teacher_prompt(row)
    assert messages[0] == {"role": "system", "content": "S"}
    assert "Problem: 2+2?" in messages[1]["content"] and "2+2=4" in messages[1]["content"]
    assert trainer.teacher_prompt({**row, "teacher_prompt": "given"}) == "given"
    with pytest.raises(ValueError, match="needs a solution"):
        trainer.teacher_prompt({"prompt": row["prompt"], "answer": "4"})


# ----------------------------------------------------------------------------------------------
# configuration and rewards


@pytest.mark.parametrize(("overrides", "message"), [
    ({"beta": 0.04}, "beta"),
    ({"objective_args": {"teacher": "live"}, "num_iterations": 2}, "num_iterations"),
    ({"objective_args": {"rho": 0.3}, "objective": "egrsd"}, "objective.rho"),
    ({"objective": "dr_grpo"}, "scale_rewards"),
    ({"teacher_template": "sibling"}, "SDPOTrainer"),
])
def test_config_refuses_what_it_cannot_honour(tmp_path, overrides, message):
    values = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "num_generations": 2,
              "per_device_train_batch_size": 2, **overrides}
    with pytest.raises(ConfigError, match=message):
        SelfDistillConfig(**values)


def _config(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "num_generations": 2,
              "per_device_train_batch_size": 2, **overrides}
    return SelfDistillConfig(**values)


def test_loss_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"loss_type='grpo' is not supported .* the loss is the objective's"):
        _config(tmp_path, loss_type="grpo")


def test_epsilon_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"epsilon=0\.3 is not supported .* eps_low / eps_high"):
        _config(tmp_path, epsilon=0.3)


def test_epsilon_high_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"epsilon_high=0\.28 is not supported .* eps_low / eps_high"):
        _config(tmp_path, epsilon_high=0.28)


def test_cast_lm_head_to_fp32_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"cast_lm_head_to_fp32=True is not supported .* teacher's stays"):
        _config(tmp_path, cast_lm_head_to_fp32=True)


def test_sync_ref_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sync_ref_model=True is not supported .* teacher='ema'"):
        _config(tmp_path, sync_ref_model=True)


def test_accumulation_that_does_not_divide_the_generation_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 does not divide steps_per_generation=3"):
        _config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=3)
    assert _config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=4).steps_per_generation == 4


def test_environment_factory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="environment_factory is not supported .* teacher prompt"):
        make_trainer(tmp_path, "dasd", trainer_kwargs={"environment_factory": lambda: object()})


def test_multimodal_inputs_are_refused(tmp_path):
    rows = [{**row, "image": None} for row in tiny_rows(2)]
    with pytest.raises(ConfigError, match=r"multimodal inputs are not supported .*\['image'\]"):
        make_trainer(tmp_path, "dasd", rows=rows)


def test_config_takes_objective_args_as_json(tmp_path):
    args = SelfDistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=2,
                             per_device_train_batch_size=2, objective="dasd",
                             objective_args='{"teacher": "ema", "ema_decay": 0.9, "beta": 0.5}')
    assert args.objective_config.knobs == {"beta": 0.5}
    assert args.objective_config.ema_decay == 0.9 and not args.sync_ref_model  # the route keeps the EMA itself


def test_boxed_answer_reward_grades_against_the_answer_column():
    reward = BoxedAnswerReward(workers=1)
    try:
        completions = [[{"role": "assistant", "content": "so \\boxed{\\frac{1}{2}}"}],
                       [{"role": "assistant", "content": "\\boxed{3}"}], [{"role": "assistant", "content": "none"}]]
        assert reward(prompts=[None] * 3, completions=completions, answer=["0.5", "4", "1"]) == [1.0, 0.0, 0.0]
        with pytest.raises(KeyError, match="answer"):
            reward(prompts=[None], completions=completions[:1], solution=["x"])
    finally:
        reward.close()
