"""Launchers other than `train --nproc`: `accelerate launch` and two torchrun nodes on loopback, each
training the `same_batches` run with 2 processes at batch 8 as one process does at batch 16.

The step counts prove the world size: 2 processes at batch 8 take 8 steps an epoch on 128 texts, one
process at batch 8 would take 16. What each launcher must keep: rank 0 alone writes the run directory
(the same files as one process's run) and reports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from ddp_helpers import REPO, assert_trains_like, half_batch, python, run, same_batches

from textclass.errors import UserError
from textclass.training import distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo")


@pytest.fixture(scope="module")
def config(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `same_batches` config; its one-process run is one/ beside it."""
    return same_batches(tiny_bert, tmp_path_factory.mktemp("launchers"))


@pytest.fixture(scope="module")
def accelerate_run(config: Path) -> Path:
    """`accelerate launch --multi_gpu --num_processes 2 -m textclass train`: torchrun underneath, on CPU too.

    HF_HOME points at a folder without an accelerate default config, so that none saved on this machine by
    `accelerate config` changes the launch.
    """
    out = config.parent / "accelerate"
    launch = ["launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "-m", "textclass", "train"]
    python("-m", "accelerate.commands.accelerate_cli", *launch, "-c", str(config), *half_batch(out), HF_HOME=str(config.parent))
    return out


def test_accelerate_launch_trains_like_one_process(config: Path, accelerate_run: Path) -> None:
    assert_trains_like(config.parent / "one", accelerate_run)


def test_two_torchrun_nodes_on_loopback(config: Path, accelerate_run: Path) -> None:
    """scripts/two_node_loopback.sh: 2 nodes of 1 process (c10d rendezvous), the same run as 1 node of 2."""
    out = config.parent / "two-node"
    script = str(REPO / "scripts" / "two_node_loopback.sh")
    done = run(["bash", script, "-c", str(config), *half_batch(out)], PYTHON=sys.executable)
    assert_trains_like(config.parent / "one", out)
    assert_trains_like(accelerate_run, out)  # 1 node of 2 processes (torchrun under accelerate)
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports
    # the first process of each node (LOCAL_RANK 0 on both) tokenized into its node's own cache
    cache = Path(os.environ["TEXTCLASS_CACHE"])
    assert all(list((cache / node / "tokenized").glob("*.arrow")) for node in ("node0", "node1"))


# -- launches that would not make one run ----------------------------------------------------------------------------
def test_processes_numbered_only_by_mpi_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """mpirun (or srun) without torchrun: each process would train alone into the same run directory."""
    for name in ("WORLD_SIZE", *distributed.MPI_WORLD_SIZES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="OMPI_COMM_WORLD_SIZE=2: .*started by MPI"):
        with distributed.session():
            pass
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # one MPI process is a plain run
    with distributed.session():
        pass


def test_accelerate_cpu_launch_of_one_process_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`accelerate launch --cpu --num_processes 2` without mpirun: one process, with MASTER_PORT for the two."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with distributed.session():
        pass
    assert not caplog.records  # one process asked for: nothing to say
    monkeypatch.setenv("MASTER_PORT", "29500")
    with distributed.session():
        pass
    assert "accelerate launch --cpu started this process alone" in caplog.text
