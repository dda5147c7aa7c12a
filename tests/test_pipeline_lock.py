"""The run-directory lock (issue 14, defect class 2): one writer at a time, the second refused at once with the
holder's pid and host, a lock left by a killed process taken over, and the pipeline holding it for a whole run."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sipo_fast.pipeline.rundir.lock import RunLock, RunLockedError, holder


def test_second_lock_is_refused_at_once_naming_pid_and_host(tmp_path):
    import threading

    with RunLock(tmp_path):
        refused = []

        def second():  # a blocking acquire would never return: the thread would stay alive
            with pytest.raises(RunLockedError, match=rf"in use by another sipo-fast run: pid {os.getpid()} on "
                                                     rf"host {socket.gethostname()}"):
                RunLock(tmp_path).acquire()
            refused.append(True)

        t = threading.Thread(target=second, daemon=True)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive() and refused == [True]
        assert holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None  # released
    RunLock(tmp_path).acquire().release()


def _hold_in_child(tmp_path, *, then: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, sys, time
        from sipo_fast.pipeline.rundir.lock import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        {then}
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = _hold_in_child(tmp_path, then="time.sleep(60)")
    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        RunLock(tmp_path).acquire()
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no chance to release
    proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid  # its record is still there
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {proc.pid}" in caplog.text and "no longer running" in caplog.text


def test_clean_release_leaves_no_warning(tmp_path, caplog):
    proc = _hold_in_child(tmp_path, then="lock.release()")
    proc.wait()
    with RunLock(tmp_path):
        pass
    assert "taking over" not in caplog.text


def test_lock_survives_the_directory_being_swapped(tmp_path):
    """A lock taken on a directory that was renamed away must not count for the new directory of that name."""
    run = tmp_path / "run"
    run.mkdir()
    old = RunLock(run).acquire()
    os.rename(run, tmp_path / "run.old")
    run.mkdir()
    with RunLock(run):  # the new directory is free, although the old one's lock is still held
        pass
    old.release()


def test_pipeline_holds_the_lock_for_the_whole_run(tmp_path):
    """While a stage runs, the directory is locked; a second pipeline on it is refused before any work."""
    from test_pipeline_runner import Recorder, make

    seen = {}

    class Probe(Recorder):
        def run(self, ctx, parts, inputs):
            seen["holder"] = holder(tmp_path / "run")
            second, runs2 = make(tmp_path)
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                second.run()
            seen["second_ran"] = list(runs2)
            return super().run(ctx, parts, inputs)

    pipe, runs = make(tmp_path)
    pipe.run(["align"])  # creates the directory
    pipe.stages["sample"] = Probe("sample", ("align",), ("sample.max_new_tokens",), runs)
    pipe.run()
    assert seen["holder"]["pid"] == os.getpid() and seen["second_ran"] == []
    assert holder(tmp_path / "run") is None  # released at the end
    assert runs == ["align", "sample", "refine", "filter"]


@pytest.mark.parametrize("attempt", range(int(os.environ.get("SIPO_FAST_STRESS", "1"))))
def test_two_runs_started_together_on_a_new_directory_one_wins(tmp_path, attempt):
    """Two runs started at the same moment on a directory that does not exist yet: exactly one runs, the other
    is refused as "in use by another sipo-fast run" (the lock is taken as the directory is created, before
    anything scans it), and the winner's manifest is complete.

    It once failed at random: the loser's probe of the lock ran before the winner took it, and its scan for
    foreign files ran after the winner's first temporary write. Stress command (200 in a row; run two at once to
    load both cores):
        SIPO_FAST_STRESS=200 .venv/bin/python -m pytest -q -p no:cacheprovider -x tests/test_pipeline_lock.py -k together
    """
    import threading

    from test_pipeline_runner import make

    gate = threading.Barrier(2)
    results, runs = {}, []

    def go(i):
        pipe, _ = make(tmp_path, runs=runs)
        gate.wait(timeout=30)
        try:
            results[i] = sorted(pipe.run())
        except ValueError as exc:  # RunLockedError
            results[i] = exc

    _race(go, results, runs, tmp_path)


def test_a_run_that_holds_a_new_directory_refuses_a_second_one_at_every_point(tmp_path):
    """Deterministic version of the race: the first run is paused inside its preflight, after it created and
    locked the directory but before it wrote anything; the second is refused for the lock, not for the files."""
    import threading

    from sipo_fast.pipeline.preflight import Findings
    from test_pipeline_runner import Ctx, make

    paused, resume = threading.Event(), threading.Event()

    class Paused(Ctx):
        def preflight(self, stages=None):
            paused.set()
            assert resume.wait(timeout=30)
            return Findings()

    results, runs = {}, []

    def first():
        pipe, _ = make(tmp_path, runs=runs)
        pipe._ctx = Paused(pipe.config)
        results["first"] = sorted(pipe.run())

    t = threading.Thread(target=first)
    t.start()
    assert paused.wait(timeout=30)
    second, _ = make(tmp_path, runs=runs)
    with pytest.raises(RunLockedError, match="in use by another sipo-fast run: pid"):
        second.run()
    resume.set()
    t.join(timeout=60)
    assert results["first"] == ["align", "filter", "refine", "sample"]


def test_a_refused_preflight_leaves_no_directory_behind(tmp_path):
    """The run creates its new directory (and the lock in it) before the preflight; when the preflight refuses,
    both go again, so a failed run leaves no trace."""
    from sipo_fast.pipeline.preflight import Findings, PreflightError
    from test_pipeline_runner import Ctx, make

    class Refuses(Ctx):
        def preflight(self, stages=None):
            return Findings(problems=["data: planted problem"])

    pipe, runs = make(tmp_path)
    pipe.run_dir.root = tmp_path / "new" / "deeper" / "run"
    pipe._ctx = Refuses(pipe.config)
    with pytest.raises(PreflightError, match="planted problem"):
        pipe.run()
    assert not (tmp_path / "new").exists() and runs == []


def _race(go, results, runs, tmp_path):
    import threading

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results.values() if isinstance(r, ValueError)]
    done = [r for r in results.values() if not isinstance(r, ValueError)]
    assert len(errors) == 1 and done == [["align", "filter", "refine", "sample"]], results
    assert "in use by another sipo-fast run: pid" in str(errors[0])
    assert sorted(runs) == ["align", "filter", "refine", "sample"]  # every stage ran once, by the winner
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == ["align", "filter", "refine", "sample"]
