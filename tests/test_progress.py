import io
import json
from types import SimpleNamespace

from orchestrator.layout import last_metrics
from orchestrator.progress import ProgressPrinter, eta_seconds, format_eta


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


def test_one_reader_of_the_metric_log_for_progress_status_and_the_trial(tmp_path):
    from orchestrator.layout import read_metrics
    from orchestrator.study import last_fid
    from orchestrator.trial import MetricLog

    log = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s, **({"eval/fid": 50.0 - s} if s % 4 == 0 else {})} for s in range(1, 400)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40')  # the last row half written
    assert read_metrics(log) == rows == MetricLog(log).rows
    assert read_metrics(log, tail=True)[-1] == rows[-1] and len(read_metrics(log, tail=True)) < len(rows)
    assert last_metrics(tmp_path) == rows[-1] and last_fid(tmp_path) == 50.0 - 396
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n[1]\n')  # garbled rows anywhere are left out
    assert read_metrics(log) == [{"step": 1}, {"step": 3}]
    assert read_metrics(tmp_path / "none.jsonl") == [] and last_fid(tmp_path / "none") is None


def test_damaged_shards_reach_the_progress_line_from_the_trials_metrics():
    from orchestrator.progress import progress_line

    row = {"step": 10, "train/loss": 0.5, "train/images_per_s": 100.0, "data/bad_shards": 2.0}
    assert "(2 damaged shards skipped)" in progress_line("c", row, 20, 32)
    assert "damaged" not in progress_line("c", {**row, "data/bad_shards": 0.0}, 20, 32)
