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


# ---- health trends: windows of 5 steps against the steps before the window (running median) or the first 5

def _fired(h):
    return [i + 1 for i in range(len(h)) if step_alarms(h, i)]


def test_length_alarm_fires_on_a_doubling_or_halving_against_the_running_median():
    lens = [100, 110, 90, 100, 100, 100, 100, 100, 300, 300, 300]
    h = rows([0.5] * len(lens), completion_len_mean=lens)
    # step 10: window steps 6-10 = (100 100 100 300 300) -> 180, median of steps 1-5 = 100: 1.8x, inside
    # step 11: window steps 7-11 -> 220, median of steps 1-6 = 100: 2.2x
    assert _fired(h) == [11]
    assert step_alarms(h, 10) == ["length: last-5-step mean 220 tokens, 2.20x its running median 100"]
    h = rows([0.5] * 10, completion_len_mean=[100] * 5 + [40] * 5)  # step 10: 40 / 100 = 0.40x
    assert step_alarms(h, 9) == ["length: last-5-step mean 40 tokens, 0.40x its running median 100"]
    # a slow drift (+2% a step for 40 steps: 2.2x overall) stays inside: the median follows it
    slow = rows([0.5] * 40, completion_len_mean=[100 * 1.02 ** k for k in range(40)])
    assert alarm_column(slow) == [""] * 40


def test_truncation_alarm_with_its_binomial_floor():
    h = rows([0.5] * 11, truncated_frac=[0.02] * 6 + [0.2] * 5, rollouts=[128] * 11)
    # step 10: window steps 6-10 = 0.164, median of steps 1-5 = 0.02: up 0.144 >= max(0.10, 3 sqrt(.02 .98 / 640) = 0.017)
    assert _fired(h) == [10, 11]
    assert step_alarms(h, 9) == ["truncation: last-5-step mean 16% of rollouts cut at the token limit, up from a running median of 2%"]
    # 30% -> 60%: fires at 128 rollouts a step; at 2 a step 3 sqrt(0.3 * 0.7 / 10) = 0.435 > 0.3 keeps it quiet
    r = [0.3] * 5 + [0.6] * 5
    assert step_alarms(rows([0.5] * 10, truncated_frac=r, rollouts=[128] * 10), 9)[0].startswith("truncation: last-5-step mean 60%")
    assert step_alarms(rows([0.5] * 10, truncated_frac=r, rollouts=[2] * 10), 9) == []


def test_format_alarm():
    h = rows([0.5] * 10, format_rate=[0.9] * 5 + [0.82] * 5)  # down 0.08 < 0.10: inside
    assert alarm_column(h) == [""] * 10
    h = rows([0.5] * 10, format_rate=[0.9] * 5 + [0.7] * 5)
    assert step_alarms(h, 9) == ["format: last-5-step mean 70% of rollouts with a boxed answer, down from a running median of 90%"]


def test_entropy_collapse_and_blow_up_against_the_first_five_steps():
    ent = [0.4] * 5 + [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]
    h = rows([0.5] * 11, entropy_mean=ent)
    # step 10: window (0.2 0.1 0.1 0.1 0.1) = 0.12 = 0.30x of 0.4; step 11: 0.10 = 0.25x, on the band
    assert _fired(h) == [11]
    assert step_alarms(h, 10) == ["entropy: token entropy last-5-step mean 0.100 nats, 0.25x its first-5-step level 0.400"]
    h = rows([0.5] * 10, entropy_mean=[0.4] * 5 + [1.2] * 5)
    assert step_alarms(h, 9) == ["entropy: token entropy last-5-step mean 1.200 nats, 3.00x its first-5-step level 0.400"]
    # no window before step 2W = 10: a collapse at steps 5-9 waits for step 10
    h = rows([0.5] * 10, entropy_mean=[0.4] * 4 + [0.01] * 6)
    assert _fired(h) == [10]
    # without the trainer's entropy, the rollout table's sampled-token NLL stands in
    h = rows([0.5] * 10, sampled_nll_mean=[0.4] * 5 + [1.2] * 5)
    assert step_alarms(h, 9) == ["entropy: sampled-token NLL last-5-step mean 1.200 nats, 3.00x its first-5-step level 0.400"]


def test_teacher_weight_entropy_collapse():
    h = rows([0.5] * 11, teacher_weight_entropy=[1.0] * 5 + [0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert _fired(h) == [11]  # step 10: 0.52 > 0.5; step 11: 0.50
    assert step_alarms(h, 10) == ["teacher weights: entropy last-5-step mean 0.500 nats, 0.50x its first-5-step level 1.000"]
    # a rise (retrieval spreading its weight) is not a collapse
    assert alarm_column(rows([0.5] * 10, teacher_weight_entropy=[0.5] * 5 + [1.4] * 5)) == [""] * 10


def test_health_alarms_follow_the_outcome_ones_and_print_once():
    h = rows([0.8] * 5 + [0.3] * 5, format_rate=[0.9] * 5 + [0.5] * 5)
    assert step_alarms(h, 9) == ["reward: last-5-step mean 0.30, down from 0.80",
                                 "format: last-5-step mean 50% of rollouts with a boxed answer, down from a running median of 90%"]
    assert [a.split(":")[0] for a in new_alarms(h)] == ["format"]  # the reward alarm already fired at step 8
    h.append({"step": 11, "reward": 0.3, "format_rate": 0.5})
    assert new_alarms(h) == []
