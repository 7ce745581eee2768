"""Collapse alarms (stages/engine/alarms.py) on hand-made metric histories."""

from stages.engine.alarms import alarm_column, new_alarms, step_alarms


def rows(rewards, **cols):
    out = [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)]
    for k, vals in cols.items():
        for r, v in zip(out, vals):
            r[k] = v
    return out


def test_reward_drop_fires_at_the_step_the_window_mean_falls_by_0_3():
    # windows of 5: steps 1-5 mean 0.8; then 0.3s come in: step 6 0.7, step 7 0.6, step 8 0.5 (drop 0.3) -> fires at 8
    h = rows([0.8] * 5 + [0.3] * 4)
    assert [bool(step_alarms(h, i)) for i in range(len(h))] == [False] * 7 + [True, True]
    assert step_alarms(h, 7) == ["reward: last-5-step mean 0.50, down from 0.80"]


def test_reward_band_widens_for_few_prompts():
    """GRPO's 2 prompts x 8 a step: a drop of 0.30 fires at 16 prompts a step (3 se = 3 sqrt(0.76 * 0.24 / 80)
    = 0.14 < 0.3) but not at 2, where a window holds 10 prompts and 3 se = 3 sqrt(0.76 * 0.24 / 10) = 0.405."""
    r = [0.6, 0.9, 0.6, 0.8, 0.6, 0.9, 0.4, 0.2, 0.4, 0.4]  # window means 0.70 0.76 0.66 0.58 0.50 0.46
    assert step_alarms(rows(r), 8) == []  # 0.26 below the best
    assert step_alarms(rows(r), 9) == ["reward: last-5-step mean 0.46, down from 0.76"]
    assert step_alarms(rows(r, prompts=[2] * len(r)), 9) == []
    # a real fall still fires at 2 prompts: 0.8 -> 0.3 is over 3 se = 3 sqrt(0.16 / 10) = 0.38
    assert step_alarms(rows([0.8] * 5 + [0.3] * 5, prompts=[2] * 10), 9) == ["reward: last-5-step mean 0.30, down from 0.80"]


def test_noisy_flat_or_rising_reward_does_not_fire():
    h = rows([0.5, 0.7, 0.4, 0.6, 0.5, 0.6, 0.4, 0.7, 0.5, 0.6, 0.8, 0.9])
    assert alarm_column(h) == [""] * len(h)


def test_eval_drop_and_polarity_mix():
    h = rows([0.5] * 6, eval_seen_avg_at_n=[None, 0.97, None, 0.90, None, 0.80],
             frac_over_suppressive=[0.1, 0.3, 0.4, 0.45, 0.5, 0.55], frac_helpful=[0.2, 0.05, 0.05, 0.05, 0.0, 0.0])
    assert step_alarms(h, 3) == []  # 0.07 below the best: inside the band; the polarity window is not full
    assert step_alarms(h, 4) == []  # over-suppressive over steps 1-5: 0.35 < 0.4
    # step 6: eval 0.80 is 0.17 below 0.97; polarity over steps 2-6: over 0.44 >= 0.4, helpful 0.03 <= 0.05
    assert step_alarms(h, 5) == ["seen avg@n 0.80, down from 0.97",
                                 "polarity: 44% of teacher pairs over-suppressive, 3% helpful (last 5 steps)"]
    assert new_alarms(h) == step_alarms(h, 5)  # step 5 had none: both are new at step 6
    # step 7 keeps the polarity alarm (over (0.4+0.45+0.5+0.55+0.6)/5 = 0.50) and has no eval: nothing new to print
    h.append({"step": 7, "reward": 0.5, "frac_over_suppressive": 0.6, "frac_helpful": 0.0})
    assert step_alarms(h, 6) == ["polarity: 50% of teacher pairs over-suppressive, 2% helpful (last 5 steps)"]
    assert new_alarms(h) == []
