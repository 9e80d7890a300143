"""`export --merge`: a LoRA run folded into full weights, as a run directory that needs no base model."""

from __future__ import annotations

import shutil
from pathlib import Path

from textclass.config import save_config
from textclass.errors import UserError
from textclass.fileio import temp_path
from textclass.rundir import ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE, HEAD_FILE, ONNX_DIR, check_run_dir, load_model

# Left behind: the adapter and head (now inside the weights) and what belongs to the unmerged run.
_NOT_COPIED = (ADAPTER_DIR, HEAD_FILE, ONNX_DIR, CHECKPOINTS_DIR)


def merge_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write `output` (default: RUN-merged beside the run): the run with its adapters merged into the weights.

    Reports, labels, parity sample and config travel along (the config then says `finetune: full`). The
    new folder appears complete or not at all; an existing non-empty `output` is refused, never replaced.
    """
    src = check_run_dir(run_dir)
    dest = Path(output) if output is not None else src.with_name(f"{src.name}-merged")
    if dest.resolve() == src.resolve() or dest.resolve().is_relative_to(src.resolve()):
        raise UserError(f"{dest}: is the run directory or inside it; choose a folder beside it for the merged run")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest}: already exists and is not empty; choose another --output (nothing was changed)")
    model = load_model(src)
    model.merge_adapter()
    tmp = temp_path(dest)
    try:
        shutil.copytree(src, tmp, ignore=lambda folder, names: [n for n in names if Path(folder) == src and n in _NOT_COPIED])
        model.save_weights(tmp)
        save_config(model.cfg, tmp / CONFIG_FILE)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        tmp.rename(dest)
    except OSError as err:
        raise UserError(f"{dest}: cannot write the merged run ({err.strerror}); choose another --output") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
