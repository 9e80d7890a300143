"""The config of a zero-shot run: any config's data and evaluation sections with a zero-shot llm model section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textclass.config import DEFAULT_LLM, Config, build_config, load_config
from textclass.errors import UserError

DEFAULT_PROMPT = "{text}\nQuestion: which topic fits the text best: {labels}?\nAnswer:"


def zero_shot_config(
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    model: str | None = None,
    prompt: str | None = None,
    output: str | Path | None = None,
) -> Config:
    """The run's config: a config file's or dict's sections (data columns, evaluation) with the model section
    made zero-shot (`family: llm`, `head: lm`), `model`/`prompt`/`output` given here taking precedence."""
    raw: dict[str, Any] = load_config(config).model_dump(mode="json") if isinstance(config, (str, Path)) else dict(config or {})
    section = dict(raw.get("model") or {})
    if section.get("family", "llm") != "llm":
        raise UserError(f"model.family: zero-shot needs a decoder LLM (family llm), the config says {section['family']!r}")
    allowed = {"name", "gguf_file", "prompt", "label_words", "max_length"}
    section = {k: v for k, v in section.items() if k in allowed} | {"family": "llm", "head": "lm"}
    section["name"] = model or section.get("name") or DEFAULT_LLM
    section["prompt"] = prompt or section.get("prompt") or DEFAULT_PROMPT
    raw["model"] = section
    if output is not None:
        raw.setdefault("training", {})["output_dir"] = str(output)
    cfg = build_config(raw, overrides)
    if not cfg.training.output_dir:
        cfg.training.output_dir = str(Path("runs") / f"zero-shot-{Path(section['name']).name}")
    return cfg
