"""Training shows progress when stdout is not a terminal: throttled log lines with
done/total, rate and ETA, for feature extraction and each epoch."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.progress import LogProgress, format_seconds, on_terminal

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_writes_at_most_one_line_per_interval() -> None:
    clock, lines = FakeClock(), []
    bar = LogProgress(400, "features train", "img", interval=30, clock=clock,
                      emit=lines.append)
    for _ in range(100):  # 100 images in 25 s: under the interval, nothing yet
        clock.now += 0.25
        bar.update(1)
    assert lines == []
    for _ in range(100):  # another 25 s: one line, at 30 s
        clock.now += 0.25
        bar.update(1)
    assert lines == ["progress features train 120/400 img (30%) 4 img/s, ETA 1m10s"]
    clock.now += 3600
    bar.update(80)
    assert len(lines) == 2 and lines[1].startswith("progress features train 280/400 img (70%)")
    assert re.search(r"ETA \d+m\d\ds$", lines[1]), lines[1]


def test_seconds_read_as_hours_minutes_seconds() -> None:
    assert format_seconds(5) == "5s"
    assert format_seconds(125) == "2m05s"
    assert format_seconds(2 * 3600 + 7 * 60) == "2h07m"


def test_under_pytest_capture_stdout_is_not_a_terminal() -> None:
    assert on_terminal() is False


@pytest.mark.slow
def test_training_through_a_pipe_logs_features_and_epoch_progress(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s %(message)s")
        import trainer.progress
        trainer.progress.INTERVAL_SECONDS = 0.0  # every update, to see every kind of line
        from tests.support.trainer_synthetic import write_folder
        from trainer.datasets import folder_records
        from trainer.splits import Split, split_records
        from trainer.train import TrainConfig, train_model
        root = write_folder(__import__("pathlib").Path({str(tmp_path / "ds")!r}),
                            n_patients=16, signal=1.0)
        parts = split_records(folder_records(root), "k", (0.6, 0.2, 0.2))
        cfg = TrainConfig(input_size=64, views=1, head_epochs=1, epochs=2, batch_size=4,
                          device="cpu")
        train_model(parts[Split.TRAIN], parts[Split.VALIDATION], cfg,
                    cache_root=__import__("pathlib").Path({str(tmp_path / "cache")!r}))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    features = [ln for ln in lines if "progress features train" in ln]
    assert features, r.stderr[-3000:]
    assert re.search(r"progress features train (\d+)/(\d+) img \(\d+%\) [\d.e+]+ img/s, "
                     r"ETA \d", features[0]), features[0]
    done, total = map(int, re.search(r"(\d+)/(\d+)", features[-1]).groups())  # type: ignore[union-attr]
    assert done == total > 0
    epochs = [ln for ln in lines if re.search(r"progress unfrozen epoch \d/2 \d+/\d+ batch", ln)]
    assert {re.search(r"epoch (\d)/2", ln).group(1) for ln in epochs} == {"1", "2"}  # type: ignore[union-attr]
    assert any(re.search(r"epoch 2/2 stage=unfrozen train_loss=", ln) for ln in lines)
    assert "\r" not in r.stderr  # no bar redrawn into a log file
