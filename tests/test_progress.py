import io
import json
from types import SimpleNamespace

from orchestrator.progress import ProgressPrinter, eta_seconds, format_eta, last_metrics


def test_progress_lines_for_running_trials_only(tmp_path):
    cells = [SimpleNamespace(name=n, train=SimpleNamespace(steps=100, global_batch=32)) for n in ("a", "b", "c")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "train/loss": 0.5, "train/images_per_s": 64.0}) + "\n"
        + json.dumps({"step": 20, "train/loss": 0.4, "train/images_per_s": 32.0, "eval/fid": 12.5}) + "\n"
        + '{"step": 3')  # a line still being written is ignored
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps({"step": 100, "train/loss": 0.1}) + "\n")
    (tmp_path / "b" / "outcome.json").write_text("{}")  # finished: not shown
    printer = ProgressPrinter(tmp_path, cells, stream=io.StringIO(), force=True)
    (line,) = printer.snapshot()
    assert "a" in line and "step      20/100" in line and "loss 0.4000" in line and "FID 12.50" in line
    assert "ETA 80s" in line  # 80 steps x 32 images / 32 img/s
    assert last_metrics(tmp_path / "c") == {}
    assert eta_seconds({"step": 0}, 10, 32) is None and format_eta(5400) == "1.5h"


def test_progress_is_quiet_when_not_a_terminal(tmp_path):
    assert not ProgressPrinter(tmp_path, [], stream=io.StringIO()).enabled
