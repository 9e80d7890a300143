"""Atomic writes and their temp files: a killed writer's leftovers are removed by the next write to the
same place; a live writer's temp, and anything that is not our temp, is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from textclass.fileio import atomic_write, pid_alive, write_json


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a running (sleeping) process of ours, ended after the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_pid_alive(live_pid: int) -> None:
    assert pid_alive(os.getpid()) and pid_alive(live_pid)
    assert not pid_alive(dead_pid())
    assert pid_alive(0) and pid_alive(-1)  # process groups, not processes: never "dead"


def test_temp_names_carry_the_pid(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("x")

    atomic_write(tmp_path / "out.csv", write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(f".out.csv.tmp-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_stale_temps_are_removed_live_ones_kept(tmp_path: Path, live_pid: int) -> None:
    dead = dead_pid()
    stale = [
        tmp_path / f".out.json.tmp-{dead}-0badc0de",
        tmp_path / f".out.json.{dead}.0badc0de.tmp",  # the format of earlier versions
    ]
    kept = [
        tmp_path / f".out.json.tmp-{live_pid}-0badc0de",  # a live writer's
        tmp_path / f".out.json.{live_pid}.0badc0de.tmp",
        tmp_path / f".other.json.tmp-{dead}-0badc0de",  # another destination's: its own writer cleans it
        tmp_path / f".out.json.tmp-0-0badc0de",  # pid 0 is no process
        tmp_path / ".out.json.notes",
        tmp_path / f"out.json.tmp-{dead}-0badc0de",  # not hidden: not ours
    ]
    for p in stale + kept:
        p.write_text("partial")
    stale_dir = tmp_path / f".out.json.old-{dead}-00000001"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "f").write_text("x")

    write_json(tmp_path / "out.json", {"a": 1})
    assert (tmp_path / "out.json").read_text(encoding="utf-8").strip().startswith("{")
    assert not any(p.exists() for p in [*stale, stale_dir])
    assert all(p.read_text() == "partial" for p in kept)


def test_failed_write_leaves_no_temp(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.csv", write)
    assert list(tmp_path.iterdir()) == []
