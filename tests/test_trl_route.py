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
    BoxedAnswerReward,
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


def make_trainer(tmp_path, method="dasd", rows=None, peft_config=None, **overrides):
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
    return SelfDistillTrainer(model=str(tiny_model_dir()), reward_funcs=[length_reward], args=args,
                              train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)


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
    rows = tiny_rows(2)
    inputs = one_batch(trainer, rows)
    per_token, stats, mask, _ = trainer.objective_terms(trainer.model, inputs)

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
    assert per_token.shape == expected.shape == inputs["completion_ids"].shape
    assert (per_token.detach() - expected).abs().max() <= 1e-6
    assert (stats.logp.detach() - reference.logp).abs().max() <= 1e-5
    if teacher is not None:
        assert (stats.teacher_logp - reference.teacher_logp).abs().max() <= 1e-5
        # the teacher really saw other prompts than the student
        assert not torch.equal(inputs["teacher_prompt_ids"][:, -3:], inputs["prompt_ids"][:, -3:]) or \
            inputs["teacher_prompt_ids"].shape != inputs["prompt_ids"].shape


@pytest.mark.slow
def test_micro_batch_losses_sum_to_the_aggregate_of_the_step(tmp_path):
    """Under gradient accumulation the micro-batch losses add up to `aggregate` over the whole step."""
    trainer = make_trainer(tmp_path, "dasd")
    inputs = one_batch(trainer, tiny_rows(2))  # 8 rows = 2 micro-batches of 4 (steps_per_generation = 2)
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        per_token, _, mask, _ = trainer.objective_terms(trainer.model, inputs)
        whole = aggregate(per_token, mask, mode="token-mean")
        halves = []
        for rows in (slice(0, 4), slice(4, 8)):
            part = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
            halves.append(trainer._compute_loss(trainer.model, part))
    assert float(inputs["num_items_in_batch"]) == float(mask.sum())
    assert abs(float(sum(halves)) - float(whole)) <= 1e-6


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


def test_config_takes_objective_args_as_json_and_sets_the_ema_rate(tmp_path):
    args = SelfDistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=2,
                             per_device_train_batch_size=2, objective="dasd",
                             objective_args='{"teacher": "ema", "ema_decay": 0.9, "beta": 0.5}')
    assert args.objective_config.knobs == {"beta": 0.5}
    assert args.ref_model_mixup_alpha == pytest.approx(0.1) and args.ref_model_sync_steps == 1


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
