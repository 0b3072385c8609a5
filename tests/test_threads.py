"""Issue 30, item 6: torch's CPU threads are the cores other processes leave free (threads.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from captioner import threads
from captioner.cli import main
from captioner.errors import ConfigError


@pytest.fixture
def policy(monkeypatch):
    """threads.py's state as a fresh process has it, torch's count restored after."""
    before = torch.get_num_threads()
    for name in ("CAPTIONER_THREADS", "OMP_NUM_THREADS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_looked", -float("inf"))
    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.setattr(threads, "_applied", type(threads._applied)())
    monkeypatch.setattr(threads, "_default", 4)
    monkeypatch.setattr(threads, "_usable_cores", lambda: 4)
    yield monkeypatch
    torch.set_num_threads(before)


def test_auto_leaves_the_cores_others_keep_busy(policy):
    busy = iter([0.1, 1.0, 2.6, 3.9, 0.0])
    policy.setattr(threads._watch, "others", lambda: next(busy))
    assert threads.fit_threads(force=True) == 4  # a tenth of a core: free
    assert threads.fit_threads(force=True) == 3
    assert threads.fit_threads(force=True) == 1  # 2.6 cores busy: 4 - 3
    assert threads.fit_threads(force=True) == 1  # never none
    assert threads.fit_threads() == 1  # within REFRESH_SECONDS: no new look
    policy.setattr(threads, "_looked", time.monotonic() - threads.REFRESH_SECONDS)
    assert threads.fit_threads() == 4  # the machine became free


def test_an_unknown_load_leaves_torchs_default(policy):
    policy.setattr(threads._watch, "others", lambda: None)  # no /proc/stat, or too soon
    torch.set_num_threads(2)
    assert threads.fit_threads(force=True) == 2


def test_the_users_number_wins(policy):
    policy.setattr(threads._watch, "others", lambda: 3.9)
    policy.setenv("CAPTIONER_THREADS", "3")
    assert threads.fit_threads(force=True) == 3
    policy.setenv("CAPTIONER_THREADS", "auto")
    policy.setenv("OMP_NUM_THREADS", "2")  # torch's own setting, as the user made it
    torch.set_num_threads(2)
    assert threads.fit_threads(force=True) == 2
    policy.setenv("CAPTIONER_THREADS", "many")
    with pytest.raises(ConfigError, match="CAPTIONER_THREADS must be a whole number"):
        threads.fit_threads(force=True)


def test_each_computing_thread_gets_the_chosen_number(policy):
    """torch keeps OpenMP's count per thread: the server's batcher thread sets its own."""
    import threading

    policy.setattr(threads._watch, "others", lambda: 2.0)
    assert threads.fit_threads(force=True) == 2
    seen = []
    worker = threading.Thread(target=lambda: seen.append(threads.fit_threads()))
    worker.start()
    worker.join()
    assert seen == [2]


def test_the_command_line_passes_threads_on(policy, capsys):
    policy.setenv("CAPTIONER_THREADS", "auto")
    assert main(["search", "dog", "--db", os.devnull, "--threads", "3"]) == 2  # (not a library: fails after parsing)
    assert os.environ["CAPTIONER_THREADS"] == "3"
    with pytest.raises(SystemExit):
        main(["caption", "x.jpg", "--threads", "0"])
    assert "--threads" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures from /proc/stat (Linux)")
def test_the_watch_sees_another_process_and_not_its_own_children():
    """A busy process that is not this one's counts; the CPU time of this process's own children does not."""
    spin = [sys.executable, "-c", "import time; t = time.time(); any(time.time() - t > 3 for _ in iter(int, 1))"]
    watch = threads._Watch()
    child = subprocess.Popen(spin)
    time.sleep(0.8)
    own = watch.others()
    child.kill()
    child.wait()
    # an orphan (its parent, a shell, ends at once) is another process
    orphan = int(subprocess.run(["bash", "-c", f"{spin[0]} -c '{spin[2]}' >/dev/null 2>&1 & echo $!"],
                                capture_output=True, text=True).stdout)
    try:
        watch = threads._Watch()
        time.sleep(0.8)
        other = watch.others()
    finally:
        os.kill(orphan, signal.SIGKILL)
    assert other is not None and other >= 0.6  # one core, less what the scheduler gave others
    assert own is not None and own < other
