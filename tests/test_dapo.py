"""DAPO batch rules (stages/engine/dapo.py) on hand values."""

import pytest
import torch

from stages.engine.dapo import (GroupFilter, dynamic_sampling_metrics, extra_prompts, filter_groups, is_informative,
                                overlong_keep, overlong_token_mask, rollout_keep)
from stages.engine.objectives.grpo import group_advantages

REWARDS = [1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0.5, 0.5000001]
GROUPS = ["g1", "g1", "g1", "g2", "g2", "g2", "g3", "g3", "g4", "g4", "g5", "g6", "g6"]


def test_all_equal_groups_are_dropped():
    f = filter_groups(REWARDS, GROUPS)
    # g1 (1,0,1) and g4 (0,1) mixed; g2 all 1, g3 all 0, g5 a group of one; g6 differs by 1e-7 > tol 0
    assert (f.kept, f.surplus, f.dropped) == (["g1", "g4", "g6"], [], ["g2", "g3", "g5"])
    assert f.drawn == 6 and f.drop_frac == pytest.approx(3 / 6)
    assert filter_groups(REWARDS, GROUPS, tol=1e-3).dropped == ["g2", "g3", "g5", "g6"]
    assert is_informative([0.0, 1.0]) and not is_informative([1.0]) and not is_informative([0.3, 0.3, 0.3])


def test_dropped_groups_are_exactly_those_with_zero_advantage():
    """Independent check against the GRPO formula: a dropped group's advantages are all 0, a kept one's not."""
    adv = group_advantages(torch.tensor([float(r) for r in REWARDS]), GROUPS)
    f = filter_groups(REWARDS, GROUPS)
    for g in ["g1", "g2", "g3", "g4", "g5", "g6"]:
        a = [adv[i].item() for i, x in enumerate(GROUPS) if x == g]
        assert (g in f.kept) == any(abs(v) > 0 for v in a), (g, a)


def test_target_keeps_the_first_informative_groups_in_draw_order():
    f = filter_groups(REWARDS, GROUPS, target=2)
    assert (f.kept, f.surplus) == (["g1", "g4"], ["g6"])
    assert f.drop_frac == pytest.approx(0.5)  # surplus groups are not dropped ones
    assert rollout_keep(GROUPS, f.kept) == [True] * 3 + [False] * 5 + [True, True] + [False] * 3
    assert filter_groups(REWARDS, GROUPS, target=0).kept == []
    with pytest.raises(ValueError):
        filter_groups(REWARDS, GROUPS, target=-1)
    with pytest.raises(ValueError, match="non-finite"):
        filter_groups([1.0, float("nan")], ["a", "a"])
    with pytest.raises(ValueError):
        filter_groups([1.0], ["a", "b"])
    assert GroupFilter().drop_frac == 0.0


def test_extra_prompts_hand_values():
    # 16 wanted, 10 of 16 kept: 6 missing at a keep rate 10/16 -> ceil(6 * 16 / 10) = ceil(9.6) = 10
    assert extra_prompts(16, 10, 16, extra_drawn=0, max_extra=32) == 10
    # one missing at 15/16: ceil(16 / 15) = 2
    assert extra_prompts(16, 15, 16, extra_drawn=0, max_extra=32) == 2
    # keep rate 1: exactly the missing count
    assert extra_prompts(16, 12, 12, extra_drawn=0, max_extra=32) == 4
    # nothing kept: rate 1/16 -> 16 * 16 = 256, capped by the budget left 32 - 20 = 12
    assert extra_prompts(16, 0, 16, extra_drawn=20, max_extra=32) == 12
    # full batch, spent budget, no budget
    assert extra_prompts(16, 16, 20, extra_drawn=4, max_extra=32) == 0
    assert extra_prompts(16, 3, 48, extra_drawn=32, max_extra=32) == 0
    assert extra_prompts(16, 3, 16, extra_drawn=0, max_extra=0) == 0
    with pytest.raises(ValueError):
        extra_prompts(16, 17, 16, extra_drawn=0, max_extra=8)
    with pytest.raises(ValueError):
        extra_prompts(16, 1, 16, extra_drawn=-1, max_extra=8)


def test_a_simulated_step_fills_the_batch_or_stops_at_the_budget():
    """Prompts alternate informative / uniform (keep rate 1/2): 8 wanted, first draw 8 -> 4 kept; next draw
    ceil(4 * 8 / 4) = 8 -> 8 kept of 16, done in one extra round.  With a budget of 5 extra prompts the step
    stops short at 4 + ceil(5 / 2) = 7."""
    def run(target, max_extra):
        rewards, groups, drawn, extra, rounds, n = [], [], 0, 0, 0, target
        while True:
            for p in range(drawn, drawn + n):
                rewards += [0.0, 1.0] if p % 2 == 0 else [1.0, 1.0]
                groups += [p, p]
            drawn += n
            extra += n if rounds else 0
            f = filter_groups(rewards, groups, target)
            n = extra_prompts(target, len(f.kept), drawn, extra_drawn=extra, max_extra=max_extra)
            if n == 0:
                return f, rounds
            rounds += 1
    f, rounds = run(8, 16)
    assert (f.kept, rounds) == ([0, 2, 4, 6, 8, 10, 12, 14], 1)
    assert dynamic_sampling_metrics(f, rounds, 8) == {"ds_groups_drawn": 16, "ds_groups_kept": 8,
                                                      "ds_groups_dropped": 8, "ds_drop_frac": 0.5,
                                                      "ds_rounds": 1, "ds_short": 0}
    f, rounds = run(8, 5)
    assert (len(f.kept), f.drawn, rounds) == (7, 13, 1)
    assert dynamic_sampling_metrics(f, rounds, 8)["ds_short"] == 1


def test_overlong_filtering_masks_truncated_rollouts():
    assert overlong_keep(["stop", "length", None, "stop"]) == [True, False, True, True]
    assert overlong_keep(["stop", "length"], enabled=False) == [True, True]
    assert overlong_token_mask([True, False, True], "length") == [False, False, False]
    assert overlong_token_mask([True, False, True], "stop") == [True, False, True]
    assert overlong_token_mask([1, 0, 1], "length", enabled=False) == [True, False, True]


