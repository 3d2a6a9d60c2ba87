"""selfdistill.study.probes: token entropy counted by kind."""

from selfdistill.models import build_tiny_model
from selfdistill.prompts import PromptBuilder
from selfdistill.study.probes import token_entropy
from selfdistill.study.search_task import solution_token_kinds
from selfdistill.study.task import StudyTask
from tests.study.helpers import TASK


def test_token_entropy_counts_every_token_by_kind(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    problems = TASK.splits().held_out
    for role, template in (("student", "opsd_mild"), ("teacher", "opsd_mild"), ("teacher", "answer_only")):
        result = token_entropy(model, tokenizer, TASK, problems, PromptBuilder(tokenizer, template=template),
                               role=role, batch_size=3)
        kinds = [solution_token_kinds(tokenizer, p)[1] for p in problems]
        assert result.tokens["fork"] == sum(row.count("fork") for row in kinds)
        assert result.tokens["marker"] == sum(row.count("marker") for row in kinds)
        assert result.tokens["forced"] == sum(row.count("forced") + 1 for row in kinds)  # + EOS
        assert all(0 < value < 7.0 for value in result.entropy.values())
    chains = StudyTask(n_eval=4, n_rl=1, n_sft=1)
    result = token_entropy(model, tokenizer, chains, chains.splits().held_out, PromptBuilder(tokenizer))
    assert set(result.entropy) == {"free", "forced"}
