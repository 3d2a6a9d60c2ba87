"""selfdistill.study.settings: settings follow the task."""

import pytest

from selfdistill.study.search_task import SearchStudyTask
from selfdistill.study.settings import METHODS, QUICK_METHODS, SWEEP_METHODS, StudySettings, method_parts


def test_settings_follow_the_task():
    search = StudySettings()
    assert search.task.name == "search" and "opsd_weak" in search.methods
    assert (search.max_new_tokens, search.ood_max_new_tokens) == (128, 224)
    assert search.views == {"rich": "opsd_mild", "weak": "answer_only"}
    chains = StudySettings.for_task("chains")
    assert chains.max_new_tokens == 48 and "opsd_weak" not in chains.methods and chains.views == {"rich": "opsd_mild"}
    with pytest.raises(ValueError, match="teacher view"):
        StudySettings.for_task("chains", methods=("opsd_weak",))
    quick = StudySettings.for_task("search", quick=True)
    assert quick.methods == QUICK_METHODS and quick.eval_limit == 16 and quick.task == SearchStudyTask()
    held_out, ood = quick.held_out()
    assert len(held_out) == len(ood) == 16 and held_out == SearchStudyTask().splits().held_out[:16]
    with pytest.raises(ValueError, match="unknown study task"):
        StudySettings.for_task("sums")
    assert set(SWEEP_METHODS) <= set(METHODS)
    # the sweep's variants each change one thing from dasd
    for name in SWEEP_METHODS:
        objective, optim, view = method_parts(name)
        changed = {k: v for k, v in objective.items() if k != "name"}
        assert objective["name"] == "dasd" and view == "rich" and len(changed) + len(optim) == 1
