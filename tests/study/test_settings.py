"""selfdistill.study.settings: settings follow the task."""

import pytest

from selfdistill.study.preregistration import CLAIMS, TUNED_KNOBS
from selfdistill.study.search_task import SearchStudyTask
from selfdistill.study.settings import METHODS, QUICK_METHODS, TUNING_METHODS, StudySettings, method_parts


def test_settings_follow_the_task():
    search = StudySettings()
    assert search.task.name == "search" and "opsd_weak" in search.methods and search.seeds == 5
    assert (search.max_new_tokens, search.ood_max_new_tokens) == (160, 256)
    assert search.views == {"rich": "opsd_mild", "weak": "answer_only"}
    # the default claim runs are exactly the methods of the registered claims
    assert set(search.methods) == {m for claim in CLAIMS for m in (claim.a, claim.b)}
    assert search.tuning == TUNING_METHODS["search"]
    chains = StudySettings.for_task("chains")
    assert chains.max_new_tokens == 48 and "opsd_weak" not in chains.methods and chains.views == {"rich": "opsd_mild"}
    assert chains.tuning == ()
    with pytest.raises(ValueError, match="teacher view"):
        StudySettings.for_task("chains", methods=("opsd_weak",))
    with pytest.raises(ValueError, match="validation slice"):
        StudySettings.for_task("chains", tuning=("dasd",))
    with pytest.raises(ValueError, match="verification_margin"):
        StudySettings(verification_margin=1.5)
    quick = StudySettings.for_task("search", quick=True)
    assert quick.methods == QUICK_METHODS and quick.eval_limit == 16 and quick.task == SearchStudyTask()
    assert quick.tuning == ()
    held_out, ood = quick.evaluation_sets("test")
    assert len(held_out) == len(ood["breadth"]) == len(ood["depth"]) == 16
    assert held_out == SearchStudyTask().splits().held_out[:16]
    validation, none = quick.evaluation_sets("validation")
    assert validation == list(SearchStudyTask().splits().validation[:16]) and none == {}
    with pytest.raises(ValueError, match="evaluation"):
        quick.evaluation_sets("train")
    # run keys change with the tuned knobs and with what a run is evaluated on
    keys = {search.run_key("dasd", 0), search.run_key("dasd", 0, {"beta": 0.3}), search.run_key("dasd", 0, None,
                                                                                                 "validation")}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="unknown study task"):
        StudySettings.for_task("sums")
    assert set(TUNING_METHODS["search"]) <= set(METHODS)
    # the tuning runs vary DASD's tuned knobs alone, and set every one of them (no run rests on a library default)
    for name in TUNING_METHODS["search"]:
        objective, optim, view = method_parts(name)
        assert objective["name"] == "dasd" and view == "rich" and not optim
        assert set(objective) == {"name", *TUNED_KNOBS}
    assert len({tuple(method_parts(name)[0].items()) for name in TUNING_METHODS["search"]}) == 6
