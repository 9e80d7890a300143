"""Helpers shared by the tests that train with several processes (torchrun, accelerate launch, two nodes).

Each launch is a subprocess in its own process group with a timeout: a hang fails the test, and the group
is stopped (SIGTERM, which torchrun's agents pass on to their workers) instead of left waiting. Where the machine
allows it, the launch also runs in its own network namespace with only the loopback interface: torch's
TCPStore (the rendezvous store torchrun and accelerate start) listens on every interface whatever address
it is given, and the namespace keeps it, like everything else, off the machine's real network.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import make_texts, no_dropout_copy, tiny_config

import textclass

TIMEOUT = 300
SRC = str(Path(textclass.__file__).resolve().parents[1])
REPO = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    """This environment with textclass importable from the source tree, and gloo on the loopback interface
    (as `train --nproc` sets it); `extra` on top."""
    out = dict(os.environ) | extra
    out["PYTHONPATH"] = SRC + os.pathsep + out.get("PYTHONPATH", "")
    if Path("/sys/class/net/lo").is_dir():
        out.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return out


@functools.cache
def loopback_only() -> tuple[str, ...]:
    """A command prefix that runs a command in a new network namespace with only `lo`, up; empty where
    `unshare` or `ip` is missing or the kernel refuses (then the launch runs on the machine's network)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not (unshare and ip):
        return ()
    for flags in (["--net"], ["--net", "--map-root-user"]):  # root, or an unprivileged user namespace
        prefix = (unshare, *flags, "--", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh")
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return ()


def run(cmd: list[str], expect: int = 0, **extra_env: str) -> subprocess.CompletedProcess:
    """`cmd`, isolated as above, with `env(**extra_env)`; asserts its exit code."""
    pipe, cmd = subprocess.PIPE, [*loopback_only(), *cmd]
    proc = subprocess.Popen(cmd, env=env(**extra_env), stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun's agent then stops its workers, which run in sessions of their own
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"{cmd[:8]}... still running after {TIMEOUT} s:\n{err[-3000:]}") from None
    assert proc.returncode == expect, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def python(*args: str, expect: int = 0, **extra_env: str) -> subprocess.CompletedProcess:
    """`python ARGS` with this interpreter."""
    return run([sys.executable, *args], expect=expect, **extra_env)


def torchrun(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """2 processes on this machine, as the docs' single-node torchrun command."""
    return python(
        "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc-per-node", "2", *args, expect=expect
    )


def files(run_dir: Path) -> set[str]:
    """The run directory's files (checkpoints aside: not part of a finished run)."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts}


def log(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "training_log.json").read_text())


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def same_batches(tiny_bert: Path, root: Path) -> Path:
    """A config (written to root/config.yaml) on which 2 processes at batch 8 see exactly the batches of 1
    process at batch 16, and the one-process run of it in root/one.

    128 training texts (8 full global batches an epoch) and no dropout: the length groups are formed over
    the global batch, so only floating-point summation order separates the runs. 4 epochs: 32 steps.
    """
    from textclass import train

    data = {}
    for split, (n, seed) in {"train": (128, 10), "valid": (30, 11), "test": (30, 12)}.items():
        data[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(data[split], index=False)
    cfg = tiny_config(no_dropout_copy(tiny_bert, root / "model"), data, root / "one", epochs=4, batch_size=16)
    cfg["model"]["dropout"] = 0.0
    train(cfg)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Launched runs of `same_batches` override these: half the batch per process, their own run directory.
def half_batch(out: Path, *extra: str) -> list[str]:
    return ["-o", str(out), "--set", "training.batch_size=8", *(a for s in extra for a in ("--set", s))]


def assert_trains_like(one: Path, two: Path) -> None:
    """`two` (2 processes at batch 8) trained like `one` (1 process at batch 16, or 2 at batch 8) and wrote
    the same run directory.

    Tolerances: measured here |valid loss difference| 0.002 after 32 steps, accuracy equal. The same
    single-process run with 1 thread instead of 2 (summation order alone) already differs by 0.0002-0.0006
    in valid loss, and the tiny model at lr 3e-3 amplifies such differences, so we allow 0.02 in loss and
    one text of 30 in accuracy. The first step's loss has seen no update yet: equal to 1e-5 (a loss of one
    process's half batch, or a doubled one, would differ).
    """
    assert files(one) == files(two)  # the same run directory, written once
    first_one, first_two = log(one)[0], log(two)[0]
    assert first_one["step"] == first_two["step"] == 1
    assert abs(first_one["loss"] - first_two["loss"]) < 1e-5
    evals_one = [h for h in log(one) if "eval_loss" in h]
    evals_two = [h for h in log(two) if "eval_loss" in h]
    assert [h["step"] for h in evals_one] == [h["step"] for h in evals_two] == [8, 16, 24, 32]  # 2 processes x 8
    assert abs(evals_one[-1]["eval_loss"] - evals_two[-1]["eval_loss"]) < 0.02
    assert abs(metrics(one)["valid"]["accuracy"] - metrics(two)["valid"]["accuracy"]) <= 1 / 30 + 1e-9
    assert metrics(two)["train"]["global_step"] == metrics(one)["train"]["global_step"] == 32
