"""Collapse alarms (stages/engine/alarms.py) on hand-made metric histories."""

from stages.engine.alarms import alarm_column, new_alarms, step_alarms


def rows(rewards, **cols):
    out = [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)]
    for k, vals in cols.items():
        for r, v in zip(out, vals):
            r[k] = v
    return out


def test_reward_drop_fires_at_the_step_the_window_mean_falls_by_0_2():
    # windows of 5: steps 1-5 mean 0.8; then 0.3s come in: step 6 mean 0.7, step 7 0.6 (drop 0.2) -> fires at 7
    h = rows([0.8] * 5 + [0.3] * 4)
    assert [bool(step_alarms(h, i)) for i in range(len(h))] == [False] * 6 + [True, True, True]
    assert step_alarms(h, 6) == ["reward: last-5-step mean 0.60, down from 0.80"]


def test_reward_band_widens_for_few_prompts():
    """GRPO's 2 prompts x 8 a step (the world run that raised a false alarm): the same series fires at 16 prompts
    a step but not at 2, where a window holds 10 prompts and 3 se = 3 sqrt(0.79 * 0.21 / 10) = 0.386."""
    r = [0.56, 1.0, 0.56, 0.81, 0.56, 1.0, 0.5, 0.19, 0.56, 0.94]  # window means: steps 2-6 0.786, steps 5-9 0.562
    assert step_alarms(rows(r), 8) == ["reward: last-5-step mean 0.56, down from 0.79"]
    assert step_alarms(rows(r, prompts=[2] * len(r)), 8) == []
    # a real fall still fires at 2 prompts: 0.8 -> 0.3 is over 3 se = 3 sqrt(0.16 / 10) = 0.38
    assert step_alarms(rows([0.8] * 5 + [0.3] * 5, prompts=[2] * 10), 9) == ["reward: last-5-step mean 0.30, down from 0.80"]


def test_noisy_flat_or_rising_reward_does_not_fire():
    h = rows([0.5, 0.7, 0.4, 0.6, 0.5, 0.6, 0.4, 0.7, 0.5, 0.6, 0.8, 0.9])
    assert alarm_column(h) == [""] * len(h)


def test_eval_drop_and_polarity_mix():
    h = rows([0.5] * 6, eval_seen_avg_at_n=[None, 0.97, None, 0.90, None, 0.86],
             frac_over_suppressive=[0.1, 0.2, 0.3, 0.35, 0.4, 0.45], frac_helpful=[0.2, 0.1, 0.05, 0.05, 0.0, 0.0])
    assert step_alarms(h, 3) == []  # 0.07 below the best: inside the band
    # step 6: eval 0.86 is 0.11 below 0.97; polarity over steps 2-6: over 0.34 >= 0.3, helpful 0.04 <= 0.1
    assert step_alarms(h, 5) == ["seen avg@n 0.86, down from 0.97",
                                 "polarity: 34% of teacher pairs over-suppressive, 4% helpful (last 5 steps)"]
    # step 5 had none (over-suppressive mean 0.27 < 0.3): both are new at step 6
    assert new_alarms(h) == step_alarms(h, 5)
    # step 7 keeps the polarity alarm (over (0.3+0.35+0.4+0.45+0.6)/5 = 0.42) and has no eval: nothing new to print
    h.append({"step": 7, "reward": 0.5, "frac_over_suppressive": 0.6, "frac_helpful": 0.0})
    assert step_alarms(h, 6) == ["polarity: 42% of teacher pairs over-suppressive, 2% helpful (last 5 steps)"]
    assert new_alarms(h) == []
