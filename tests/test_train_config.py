"""Training choices are settings: operators set them with CXR_* variables."""

from __future__ import annotations

import pytest

from db.settings import SettingsError, load_settings
from trainer.train import TrainConfig


def test_training_choices_come_from_settings() -> None:
    s = load_settings(env={"CXR_TRAIN_CONTRAST": "none", "CXR_TRAIN_CUTOFF": "12",
                           "CXR_TRAIN_VIEWS": "1", "CXR_TRAIN_BALANCE": "source_class",
                           "CXR_INPUT_SIZE": "224"})
    cfg = TrainConfig.from_settings(s)
    assert (cfg.contrast, cfg.cutoff, cfg.views, cfg.balance, cfg.input_size) == (
        "none", 12, 1, "source_class", 224)
    default = TrainConfig.from_settings(load_settings(env={}))
    assert (default.contrast, default.cutoff, default.views, default.balance) == (
        "clahe", "block15", 3, "class")


@pytest.mark.parametrize("env", [{"CXR_TRAIN_CONTRAST": "sharpen"},
                                 {"CXR_TRAIN_BALANCE": "site"}, {"CXR_TRAIN_VIEWS": "0"}])
def test_bad_training_choices_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(env=env)
