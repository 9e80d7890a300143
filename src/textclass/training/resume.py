"""What `train --resume` may continue from, and with which config.

A checkpoint folder is complete once the Trainer wrote `trainer_state.json`: it writes the weights, the
optimizer, scheduler and RNG states first and that file last, so a folder without it was cut short (a kill
while saving) and its other files may be truncated. Resuming skips such folders and takes the last
complete one.

The config an interrupted run started with is kept in `checkpoints/textclass_config.yaml`. A resumed run
must train the same model on the same data with the same optimisation, or the result is neither the old
run nor a new one: keys outside `RESUMABLE` must be unchanged. The resumable ones change nothing already
trained (more epochs, logging, evaluation options) and are recorded as the values in force.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from textclass.config import Config, upgrade_run_config
from textclass.errors import UserError
from textclass.rundir import CHECKPOINTS_DIR, CONFIG_FILE, PENDING_CONFIG

log = logging.getLogger("textclass")
TRAINER_STATE = "trainer_state.json"  # the Trainer's last write into a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resumed run may change: they act after training or only on what is still to come.
RESUMABLE = {
    "training.epochs",
    "training.max_steps",
    "training.eval_batch_size",
    "training.logging_steps",
    "training.save_total_limit",
    "training.keep_checkpoints",
    "training.tensorboard",
    "training.num_threads",
    "training.output_dir",
    "evaluation.threshold",
    "evaluation.tune_threshold",
    "evaluation.badcases",
}
# Of those, keys that may only grow: fewer epochs than already trained cannot be honoured.
ONLY_GROW = {"training.epochs", "training.max_steps"}


def pending_config(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR / PENDING_CONFIG


def load_pending_config(run_dir: Path) -> dict[str, Any]:
    """The raw config an unfinished run was started with (for `train --resume` without --config)."""
    p = pending_config(run_dir)
    if not p.is_file():
        if (run_dir / CONFIG_FILE).is_file():
            raise UserError(
                f"{run_dir}: this run finished; nothing to resume (start a new one with --overwrite or another --output)"
            )
        raise UserError(f"{run_dir}: no unfinished run to resume here (no checkpoints/{p.name}); train without --resume")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: unreadable; the interrupted run cannot be resumed, train again with --overwrite")
    return upgrade_run_config(raw)  # written by an older textclass: small-model keys of other archs dropped


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(run_dir: Path, cfg: Config) -> dict[str, list[Any]]:
    """Compare `cfg` (defaults resolved) with the interrupted run's; returns the allowed changes as {key: [old, new]}.

    Refuses, in one line naming the keys, changes that the checkpoint cannot continue with.
    """
    from textclass.config import build_config

    before = _flat(build_config(load_pending_config(run_dir), source=str(pending_config(run_dir))).model_dump(mode="json"))
    after = _flat(cfg.model_dump(mode="json"))
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    refused = [k for k in changed if k not in RESUMABLE]
    shrunk = [k for k in changed if k in ONLY_GROW and _shrinks(*changed[k])]
    if refused or shrunk:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in (refused or shrunk)[:5])
        why = "cannot change on --resume" if refused else "can only grow on --resume"
        raise UserError(
            f"{run_dir}: {shown} {why}: the checkpoints were trained with the old value; resume with the run's "
            f"config ({pending_config(run_dir)}) or start a new run with --overwrite or another --output"
        )
    for key, (old, new) in changed.items():
        log.info("resuming with %s changed: %r -> %r", key, old, new)
    return changed


def _shrinks(old: Any, new: Any) -> bool:
    # max_steps -1 means "use epochs"; going to or from it is a change of kind, judged by epochs
    if old is None or new is None or old < 0 or new < 0:
        return False
    return bool(new < old)


def _is_complete(folder: Path) -> bool:
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(run_dir: Path, quiet: bool = False) -> str | None:
    """The newest complete checkpoint folder; incomplete newer ones are removed, saying so.

    Removing them (they are this run's own half-written saves) keeps the Trainer from later writing a
    checkpoint of the same step over stale files, or rotating away the complete one it resumed from.
    """
    folder = run_dir / CHECKPOINTS_DIR
    found = sorted(
        (
            (int(m.group(1)), p)
            for p in (folder.iterdir() if folder.is_dir() else [])
            if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
        ),
        reverse=True,
    )
    for _step, path in found:
        if _is_complete(path):
            return str(path)
        if not quiet:
            log.warning(
                "%s: incomplete (no %s; cut short while saving?), removed; resuming from an earlier one", path, TRAINER_STATE
            )
            shutil.rmtree(path, ignore_errors=True)
    return None
