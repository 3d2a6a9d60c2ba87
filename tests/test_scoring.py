"""selfdistill.scoring: PPO mini-batches of whole prompt groups, reshuffled per epoch from a seed."""

from selfdistill.scoring import minibatches


def test_minibatches_take_whole_prompt_groups_where_they_can():
    expected = {1: [[0, 1, 2, 3, 4, 5]], 2: [[0, 1, 2, 3], [4, 5]], 3: [[0, 1], [2, 3], [4, 5]],
                4: [[0, 1], [2, 3], [4], [5]], 6: [[0], [1], [2], [3], [4], [5]]}
    for parts, rows in expected.items():  # 3 prompts x 2 samples
        assert minibatches(6, group_size=2, parts=parts) == rows


def test_shuffled_minibatches_are_a_seeded_partition_of_the_same_sizes():
    """Shuffled parts: every row once, each part's rows ascending and whole prompt groups, the unshuffled parts'
    sizes; the same parts for the same seed, other parts for other seeds; one part is every row whatever the seed."""
    plain = minibatches(12, group_size=2, parts=3)
    drawn = {seed: minibatches(12, group_size=2, parts=3, seed=seed) for seed in range(6)}
    for parts in drawn.values():
        assert sorted(row for part in parts for row in part) == list(range(12))
        assert [len(part) for part in parts] == [len(part) for part in plain]
        assert all(part == sorted(part) and all(part[i] // 2 == part[i + 1] // 2 for i in range(0, len(part), 2))
                   for part in parts)
    assert drawn[0] == minibatches(12, group_size=2, parts=3, seed=0)
    assert len({str(parts) for parts in drawn.values()}) > 1
    assert minibatches(12, group_size=2, parts=1, seed=3) == [list(range(12))]
    rows = minibatches(6, group_size=4, parts=3, seed=1)  # fewer prompts than parts: single rows
    assert sorted(row for part in rows for row in part) == list(range(6)) and [len(p) for p in rows] == [2, 2, 2]
