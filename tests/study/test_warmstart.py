"""selfdistill.study.warmstart: the SFT and drill losses, the cached warm start and the shipped one."""

import math
import random
import re

import pytest
import torch

from selfdistill.models import build_tiny_model, build_tiny_tokenizer, load_model
from selfdistill.prompts import PromptBuilder
from selfdistill.study.settings import TASKS, StudySettings, WarmStartSettings
from selfdistill.study.task import StudyTask
from selfdistill.study.warmstart import (
    CONVERGENCE_FIELDS,
    FIRST_LOSSES,
    SHIPPED_DIR,
    ShippedWarmStartError,
    drill_accuracy,
    drill_loss,
    drill_sequences,
    file_digests,
    read_shipped_index,
    read_warm_start_record,
    sft_loss,
    ship_warm_start,
    shipped_warm_start,
    train_warm_start,
    warm_start_dir,
    warm_start_key,
)
from tests.study.helpers import TINY_TASK, TINY_WARM_START


def test_sft_loss_is_the_mean_response_token_nll(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    prompts = [[1, 40, 41, 42, 43], [1, 50]]
    responses = [[60, 61, 2], [70, 2]]
    expected_sum, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            ids = torch.tensor([prompt + response])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)  # [L, V]
            for t, token in enumerate(response):
                expected_sum -= float(log_probs[len(prompt) - 1 + t, token])
                count += 1
        loss = sft_loss(model, prompts, responses, pad_id=tokenizer.pad_token_id)
    assert float(loss) == pytest.approx(expected_sum / count, rel=1e-4)


@pytest.mark.parametrize("modulus", [10, None])
def test_drill_sequences_are_true_operations_in_the_solution_format(tokenizer, modulus):
    task = StudyTask(modulus=modulus)
    sequences, masks = drill_sequences(tokenizer, task, random.Random(0), num_facts=40, max_lines=5)
    lines = []
    for ids, mask in zip(sequences, masks, strict=True):
        text = tokenizer.decode(ids)
        assert text.startswith("\n") and text.endswith("\n") and list(tokenizer.encode(text)) == ids
        seq_lines = text.strip("\n").split("\n")
        assert 1 <= len(seq_lines) <= 5
        results = "".join(tokenizer.decode([i]) for i, is_result in zip(ids, mask, strict=True) if is_result)
        assert results == "".join(line.split("=")[1] for line in seq_lines)
        lines += seq_lines
    assert len(lines) == 40
    for line in lines:
        match = re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)", line)
        assert match, line
        a, operator, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        value = {"+": a + b, "-": a - b, "*": a * b}[operator]
        assert result == (value % modulus if modulus else value)
        assert modulus is None or a < modulus


def test_drill_loss_counts_result_tokens_only(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    sequences = [[40, 41, 42, 43, 44], [50, 51, 52]]
    masks = [[False, False, True, False, True], [False, True, False]]
    with torch.no_grad():
        expected = []
        for ids, mask in zip(sequences, masks, strict=True):
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # [L, V]
            expected += [-float(log_probs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j]]
        loss = drill_loss(model, sequences, masks, pad_id=tokenizer.pad_token_id)
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-4)


class _Oracle(torch.nn.Module):
    """Predicts each next token of the sequence it is given (it reads ahead), except that it says `wrong` after
    every "*" operation: drill_accuracy must count exactly the products as wrong."""

    def __init__(self, vocab: int, tokenizer, wrong: bool) -> None:
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.times = tokenizer.encode("*", add_special_tokens=False)[0]
        self.equals = tokenizer.encode("=", add_special_tokens=False)[0]

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        for j in range(len(ids) - 1):
            logits[0, j, ids[j + 1]] = 1.0
            if self.wrong and ids[j] == self.equals and self.times in ids[max(0, j - 3):j]:
                logits[0, j, ids[j + 1]] = 0.0
                logits[0, j, (ids[j + 1] + 1) % self.vocab] = 1.0
        from types import SimpleNamespace

        return SimpleNamespace(logits=logits)


def test_drill_accuracy_counts_facts_whose_result_is_predicted(tokenizer):
    task = StudyTask()
    assert drill_accuracy(_Oracle(len(tokenizer), tokenizer, False), tokenizer, task, num_facts=200,
                          max_lines=5) == 1.0
    sequences, _ = drill_sequences(tokenizer, task, random.Random(7_919), num_facts=200, max_lines=5)
    text = "".join(tokenizer.decode(ids) for ids in sequences)
    products = len(re.findall(r"\d\*\d+=", text))
    accuracy = drill_accuracy(_Oracle(len(tokenizer), tokenizer, True), tokenizer, task, num_facts=200, max_lines=5)
    assert 0 < products < 200 and accuracy == pytest.approx(1 - products / 200)


def test_drill_to_convergence_stops_once_the_held_out_drill_reaches_the_target(tmp_path, monkeypatch):
    import selfdistill.study.warmstart as warmstart

    settings = WarmStartSettings(**{**TINY_WARM_START.__dict__, "drill_target": 0.9, "drill_check_every": 2,
                                    "drill_check_facts": 16, "drill_max_steps": 9})
    assert settings.total_steps == 3 + 9
    measured = iter([0.1, 0.5, 0.95, 1.0])
    monkeypatch.setattr(warmstart, "drill_accuracy", lambda *args, **kwargs: next(measured))
    record = read_warm_start_record(warm_start_dir(TINY_TASK, settings, cache=tmp_path))
    # drill_steps (2) of stage 2 first, then a check every 2 steps until one reaches 0.9
    assert record["drill_checks"] == {"5": 0.1, "7": 0.5, "9": 0.95} and record["steps_trained"] == 9
    monkeypatch.undo()
    never = WarmStartSettings(**{**settings.__dict__, "drill_target": 1.0, "drill_max_steps": 4})
    log: list = []
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    losses = train_warm_start(model, tokenizer, TINY_TASK, TINY_TASK.splits().sft_train, never, drill_log=log)
    assert len(losses) == 3 + 4 and [step for step, _ in log] == [5, 7]  # the cap ends it (accuracy < 1)
    with pytest.raises(ValueError, match="drill_max_steps"):
        WarmStartSettings(drill_target=0.9, drill_steps=600, drill_max_steps=100)


def test_warm_start_is_cached_by_its_settings(tmp_path):
    steps_seen = []
    folder = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path, on_step=lambda s, loss: steps_seen.append(s))
    assert steps_seen == [1, 2, 3, 4, 5]  # 3 task steps, then 2 task + drill steps
    record = read_warm_start_record(folder)
    assert record["settings"]["steps"] == 3 and list(record["loss_curve"]) == ["5"]
    assert all(math.isfinite(v) for v in record["loss_curve"].values())
    model, tok = load_model(folder)  # a standard HF folder
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]

    again = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path, on_step=lambda s, loss: steps_seen.append(s))
    assert again == folder and steps_seen == [1, 2, 3, 4, 5]  # reused, not retrained
    other = WarmStartSettings(**{**TINY_WARM_START.__dict__, "teacher_fraction": 0.0})
    assert warm_start_key(TINY_TASK, other) != warm_start_key(TINY_TASK, TINY_WARM_START)
    assert warm_start_key(StudyTask(n_eval=4, n_rl=6, n_sft=13), TINY_WARM_START) != folder.name[-12:]


def test_shipped_warm_start_is_used_when_its_digests_match_and_skipped_on_rebuild(tmp_path):
    built = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "cache")
    key = warm_start_key(TINY_TASK, TINY_WARM_START)
    shipped = tmp_path / "assets"
    target = ship_warm_start(built, key, shipped=shipped)
    assert read_shipped_index(shipped)[key]["sha256"] == file_digests(target)
    assert "model.safetensors" in file_digests(target) and "selfdistill-complete.json" not in file_digests(target)
    steps = []
    found = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped,
                           on_step=lambda s, loss: steps.append(s))
    assert found == target and steps == [] and not (tmp_path / "other").exists()  # no training, no cache
    rebuilt = warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped, rebuild=True,
                             on_step=lambda s, loss: steps.append(s))
    assert rebuilt.parent == tmp_path / "other" and steps == [1, 2, 3, 4, 5]
    # the same training on the same machine gives the same bytes
    assert file_digests(rebuilt)["model.safetensors"] == file_digests(target)["model.safetensors"]
    other = WarmStartSettings(**{**TINY_WARM_START.__dict__, "seed": 1})
    assert shipped_warm_start(warm_start_key(TINY_TASK, other), shipped) is None  # other settings: not shipped
    (target / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ShippedWarmStartError, match="model.safetensors"):
        warm_start_dir(TINY_TASK, TINY_WARM_START, cache=tmp_path / "other", shipped=shipped)


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_the_package_ships_the_study_warm_start_of_the_current_code(task_name):
    """Each task's default study warm start is shipped, its files match their digests, its record holds the
    current settings, and the current code reproduces its first training steps: a change to the settings,
    the task, the tiny model or the warm-start procedure fails here (then rebuild and ship it, docs/study.md)."""
    study = StudySettings.for_task(task_name)
    task, settings = study.task, study.warm_start
    key = warm_start_key(task, settings)
    index = read_shipped_index()
    assert key in index, f"no shipped warm start for key {key}; shipped: {sorted(index)}"
    folder = shipped_warm_start(key)  # checks every file's SHA-256
    assert folder is not None and folder.parent == SHIPPED_DIR
    assert set(index[key]["sha256"]) >= {"model.safetensors", "config.json", "tokenizer.json", "warm_start.json"}
    assert (folder / "model.safetensors").stat().st_size < 4_000_000
    record = read_warm_start_record(folder)
    expected = {k: v for k, v in settings.__dict__.items() if settings.drill_target is not None
                or k not in CONVERGENCE_FIELDS}  # a record from before the convergence knobs lacks them
    assert {k: record["settings"].get(k) for k in expected} == expected and record["task"] == task.to_json()
    model, tokenizer = load_model(folder)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    built = build_tiny_tokenizer()  # the warm start trains with this one; the study loads the saved one
    problems = task.splits().held_out[:8]
    for template in {settings.template, *task.teacher_views(settings.template).values()}:
        for role in ("student", "teacher"):
            ids = [getattr(PromptBuilder(tok, template=template), f"{role}_ids")(p)
                   for p in problems for tok in (tokenizer, built)]
            assert ids[0::2] == ids[1::2]
    # the weights were trained with the built tokenizer (the saved one gains an unused <|endoftext|>)
    tokenizer = built
    # retrain the first steps from scratch: the losses agree with the shipped build's to float noise
    fresh = build_tiny_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                             seed=settings.seed)
    steps = 3
    assert len(record["first_losses"]) == FIRST_LOSSES >= steps
    losses = train_warm_start(fresh, tokenizer, task, task.splits().sft_train, settings, stop_after=steps)
    # another CPU's kernels move these by ~1e-6 (docs/study.md); a change to the procedure moves them more
    assert losses == pytest.approx(record["first_losses"][:steps], abs=2e-5)
