"""Learning-rate schedules: warm-up, then constant, cosine, linear or step decay."""

import pytest

from weatherkd import config as C
from weatherkd.engine.schedule import lr_multiplier


def test_step_schedule_halves_every_interval_after_warmup():
    cfg = C.TrainConfig(max_steps=1000, schedule="step", warmup_steps=10, decay_every=100, decay_factor=0.5)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert [lr_multiplier(s, cfg) for s in (10, 109, 110, 310, 1009)] == [1.0, 1.0, 0.5, 0.125, 0.5**9]


def test_cosine_ends_at_its_floor():
    cfg = C.TrainConfig(max_steps=100, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == 1.0 and lr_multiplier(100, cfg) == pytest.approx(0.1)


def test_a_step_schedule_without_an_interval_is_refused_at_load():
    with pytest.raises(C.ConfigError, match="train.schedule: step needs train.decay_every > 0"):
        C.load(C.StageConfig, None, ["train.schedule=step"])
