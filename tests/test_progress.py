"""Progress off a terminal: one plain line per step, with elapsed time and an estimate of what is left."""

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console

from r1v_quant.progress import clock, eta, step_line, steps


def test_eta_is_the_mean_pace_times_the_steps_left():
    assert eta(30.0, 3, 10) == 70.0
    assert eta(5.0, 0, 10) is None and eta(5.0, 2, None) is None
    assert [clock(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
    assert step_line("AWQ layer", 2, 4, "err 0.1", 10.0) == "AWQ layer 2/4  err 0.1  elapsed 10s  ETA 10s"


def test_steps_off_a_terminal_print_one_line_per_step():
    buf = io.StringIO()
    with steps(Console(file=buf, force_terminal=False, width=200)) as step:
        for i in range(1, 4):
            step("reference", i, 3)
            step("reference", i, 3)  # a repeated report is not a new line
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("reference 1/3  elapsed") and lines[-1].endswith("ETA 0s")


def test_the_clock_starts_with_the_work_not_with_the_first_report(monkeypatch):
    import r1v_quant.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    buf = io.StringIO()
    with steps(Console(file=buf, force_terminal=False, width=200)) as step:
        now[0] = 130.0
        step("AWQ layer", 1, 4, "")
        now[0] = 150.0
        step("AWQ layer", 2, 4, "")
        now[0] = 160.0
        step("candidate", 1, 2, "")  # the next model's clock starts where the last one stopped
    assert buf.getvalue().splitlines() == ["AWQ layer 1/4  elapsed 30s  ETA 1m30s", "AWQ layer 2/4  elapsed 50s  ETA 50s",
                                           "candidate 1/2  elapsed 10s  ETA 10s"]


@pytest.mark.slow
def test_awq_redirected_to_a_file_prints_a_line_per_layer(tiny_dir, tmp_path):
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "r1v_quant.cli.main", "awq", "--model", str(tiny_dir), "--out", str(tmp_path / "out"),
           "--samples", "2", "--max-tokens", "768", "--seq-len", "384", "--grid", "4", "--no-kl-check"]
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    layers = re.findall(r"^AWQ layer (\d+)/(\d+)  err \S+ \(RTN \S+\)  elapsed \S+  ETA \S+$", text, re.M)
    total = int(layers[0][1])
    assert [int(i) for i, _ in layers] == list(range(1, total + 1))
    # then the same summary table as on a terminal
    assert text.index("per-layer relative output error") > text.rindex("AWQ layer")
    assert "\x1b[" not in text
