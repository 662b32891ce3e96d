"""schedules.py: learning-rate and margin schedules as pure functions of the step."""

import argparse

import pytest

from speakerkit.schedules import margin, step_lr, training_schedule, warmup_exp


def test_step_lr_is_the_original_steplr():
    assert step_lr(0.001, 0.97, 1, 1) == 0.001
    assert step_lr(0.001, 0.97, 1, 3) == pytest.approx(0.001 * 0.97 ** 2)
    assert [step_lr(1.0, 0.5, 2, e) for e in (1, 2, 3, 4, 5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_warmup_exp_warms_up_linearly_then_decays_to_the_final_lr():
    def lr(epoch, step):
        return warmup_exp(0.1, 1e-4, 2, 10, epoch, step, 50)
    assert lr(1, 1) == pytest.approx(0.1 / 100)                       # 1 of 100 warm-up steps
    assert lr(1, 50) == pytest.approx(0.1 * 1e-3 ** (49 / 499) * 0.5)  # half way through the warm-up
    assert lr(3, 1) == pytest.approx(0.1 * 1e-3 ** (100 / 499))       # warm-up over, decay only
    assert lr(10, 50) == pytest.approx(1e-4)                           # the last step
    values = [lr(e, s) for e in range(1, 11) for s in range(1, 51)]
    assert values[0] < values[9] < values[49]
    assert all(a > b for a, b in zip(values[99:], values[100:]))
    assert warmup_exp(0.1, 1e-4, 0, 10, 1, 1, 50) == pytest.approx(0.1)


def test_margin_rises_linearly_between_its_epochs():
    def at(epoch, step):
        return margin(0.2, 3, 5, epoch, step, 10)
    assert at(1, 1) == at(2, 10) == at(3, 1) == 0.0
    assert at(4, 1) == pytest.approx(0.1)
    assert at(4, 6) == pytest.approx(0.2 * 1.5 / 2)
    assert at(5, 1) == at(9, 7) == pytest.approx(0.2)
    assert margin(0.2, 2, 2, 1, 10, 10) == 0.0 and margin(0.2, 2, 2, 2, 1, 10) == 0.2


def test_training_schedule_combines_the_flags():
    args = argparse.Namespace(scheduler='step', lr=0.001, lr_decay=0.97, lr_decay_every=1, m=0.2,
                              margin_schedule=None, final_lr=5e-5, warmup_epochs=6, max_epoch=80)
    assert training_schedule(args)(2, 7, 100) == (pytest.approx(0.00097), 0.2)
    args.lr_decay_every = 10
    assert [training_schedule(args)(e, 1, 100)[0] for e in (10, 11, 21)] == \
        [0.001, pytest.approx(0.00097), pytest.approx(0.001 * 0.97 ** 2)]
    args.scheduler, args.margin_schedule = 'warmup_exp', [1, 3]
    lr, m = training_schedule(args)(2, 1, 100)
    assert lr == pytest.approx(warmup_exp(0.001, 5e-5, 6, 80, 2, 1, 100)) and m == pytest.approx(0.1)


def test_warmup_exp_reaches_the_final_lr_and_keeps_falling_when_epochs_differ_in_steps():
    steps = [50, 47, 53, 44, 50, 49, 52, 45, 51, 46]  # what a pair sampler's plans give, epoch by epoch
    values = [warmup_exp(0.1, 1e-4, 2, 10, epoch, step, count)
              for epoch, count in enumerate(steps, start=1) for step in range(1, count + 1)]
    assert values[-1] == pytest.approx(1e-4, rel=1e-12)
    after_warmup = values[sum(steps[:2]):]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))
    assert values[0] < values[9] < values[49] < values[60]
    for step in range(1, 51):  # a fixed count: the step counter's (n - 1) / (total - 1), n the global step
        assert warmup_exp(0.1, 1e-4, 2, 10, 3, step, 50) == pytest.approx(0.1 * 1e-3 ** ((100 + step - 1) / 499),
                                                                           rel=1e-12)


def test_the_margin_reaches_m_at_the_beginning_of_its_end_epoch_whatever_the_step_counts():
    for count in (7, 10, 13):
        assert margin(0.2, 2, 4, 4, 1, count) == 0.2 and margin(0.2, 2, 4, 3, count, count) < 0.2
        assert margin(0.2, 2, 4, 2, 1, count) == 0.0
