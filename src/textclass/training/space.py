"""The search space of `textclass tune`: space.yaml maps dotted config keys to Optuna distributions.

```yaml
training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
training.batch_size: {type: categorical, choices: [8, 16]}
training.epochs: {type: int, low: 1, high: 4}
```

A key is a key of the config `textclass train` reads, and a trial's config is the base config with the
trial's values set (`with_values`), validated by the same schema. Before anything trains, `check_space`
puts each end of each range (and each choice) into the base config on its own, so a typo in a key, a value
of the wrong type or out of the key's range is one line naming space.yaml and the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from textclass.config import Config, build_config, read_config_file
from textclass.errors import UserError

# Keys a search must not vary: the data (read once for every trial), the objective itself, what a trial
# cannot be (k folds, a distilled student), where a run is written, and what a trial never uses (it keeps
# no checkpoints and writes no reports; the threads are set once).
NO_EFFECT = "a trial does not use it (no checkpoints, no reports, threads set once); set it in the config"
FIXED = {
    "data": "the data is read once for all trials; set it in the config",
    "distill": "tune does not distil; tune the student's config with `textclass train` settings",
    "training.kfold": "a trial is one model; tune without k-fold, then train the best config with training.kfold",
    "training.best_metric": "it is the objective every trial is compared by; set it in the config",
    "training.output_dir": "each trial trains in the tune folder; pass --output instead",
    **{key: NO_EFFECT for key in ("training.keep_checkpoints", "training.save_total_limit", "training.num_threads")},
    **{key: NO_EFFECT for key in ("evaluation.tune_threshold", "evaluation.badcases")},
}
EXAMPLE = "e.g. training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}"


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FloatParam(_Param):
    """A float in [low, high]; `log`: sampled on a log scale; `step`: on a grid of that step."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _valid(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step is not None)
        return self

    def suggest(self, trial: Any, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step))

    def ends(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Param):
    """An integer in [low, high] (both included); `log`: sampled on a log scale; `step`: every step-th."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.step != 1)
        return self

    def suggest(self, trial: Any, name: str) -> int:
        return int(trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log))

    def ends(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(_Param):
    """One of `choices`: numbers, strings, booleans or null (Optuna's kinds of choice)."""

    type: Literal["categorical"]
    choices: list[None | bool | int | float | str] = Field(min_length=1)

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def ends(self) -> list[Any]:
        return list(self.choices)


Param = FloatParam | IntParam | CategoricalParam
_PARAM: TypeAdapter[Param] = TypeAdapter(Annotated[Param, Field(discriminator="type")])


def _check_range(low: float, high: float, log: bool, step: bool) -> None:
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low})")
    if log and step:
        raise ValueError("log and step exclude each other; drop one")


def read_space(path: str | Path) -> dict[str, Param]:
    """space.yaml as {dotted key: distribution}; a missing or broken file, a key that is no config key or
    may not be searched, or a malformed distribution is a one-line UserError naming the file and the key."""
    raw, source = read_config_file(path, what="search space", shape=f"of dotted config keys to distributions, {EXAMPLE}")
    if not raw:
        raise UserError(f"{source}: the search space is empty; give at least one key, {EXAMPLE}")
    space: dict[str, Param] = {}
    for key, spec in raw.items():
        _check_key(str(key), source)
        try:
            space[str(key)] = _PARAM.validate_python(spec)
        except ValidationError as err:
            raise UserError(f"{source}: `{key}`: {_describe(err)}; {EXAMPLE}") from None
    return space


def _check_key(key: str, source: str) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in Config.model_fields:
        raise UserError(
            f"{source}: `{key}`: keys are dotted config keys starting with a section "
            f"({', '.join(Config.model_fields)}), e.g. training.learning_rate"
        )
    for prefix, why in FIXED.items():
        if key == prefix or key.startswith(prefix + "."):
            raise UserError(f"{source}: `{key}` cannot be searched: {why}")


def _describe(err: ValidationError) -> str:
    """The first problem of a distribution, in the words of space.yaml."""
    e = err.errors()[0]
    where = [str(p) for p in e["loc"] if str(p) not in ("float", "int", "categorical")]
    if e["type"] == "model_attributes_type" or e["type"] == "model_type":
        return "must be a mapping with `type` (float, int or categorical)"
    if e["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return "`type` must be float, int or categorical"
    if e["type"] == "missing":
        return f"`{where[-1]}` is missing"
    if e["type"] == "extra_forbidden":
        return f"unknown field `{where[-1]}` (a distribution takes type, low, high, log, step or choices)"
    if where[:1] == ["choices"] and len(where) > 1:
        return f"the choice {e['input']} is not a number, a string, a boolean or null (Optuna's kinds of choice)"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"`{where[0]}`: {msg[:1].lower()}{msg[1:]}" if where else msg


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config with each dotted key set to its value (sections created as needed)."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        *sections, name = key.split(".")
        node = out
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[name] = value
    return out


def trial_config(raw: dict[str, Any], values: dict[str, Any], source: str) -> Config:
    """The base config with these values, validated; an impossible combination is a UserError naming them."""
    shown = ", ".join(f"{k}: {v!r}" for k, v in values.items())
    return build_config(with_values(raw, values), source=f"{source} ({shown})")


def check_space(space: dict[str, Param], raw: dict[str, Any], source: str) -> None:
    """Each end of each range, and each choice, set alone in the base config must make a valid config."""
    for key, param in space.items():
        for value in param.ends():
            trial_config(raw, {key: value}, source)
