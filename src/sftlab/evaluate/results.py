"""What ``sftlab eval`` writes and ``sftlab compare`` reads: eval_results.json and generated_predictions.jsonl.

``eval_results.json``::

    {"model": str, "adapter": str | null, "dataset": [str], "n_samples": int,
     "metrics": {name: float | null}, "generation": {settings} | null, "latency": {...} | null,
     "created": ISO 8601 time}

Metric names: ``eval_loss``, ``perplexity`` and the scores of :mod:`sftlab.evaluate.metrics` (0–100).
A value that is not finite (a perplexity that overflowed) is written as null, so the file stays strict JSON.

``generated_predictions.jsonl`` beside it, one line per sample::

    {"index": int, "ref": "file:line", "prompt": str, "reference": str, "prediction": str, "scores": {name: float}}

Both are written atomically (a temporary file in the same directory, then ``os.replace``). Keys a reader
does not know are ignored, so files from a newer sftlab still open.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sftlab.errors import SftlabError
from sftlab.files import atomic_write

RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "generated_predictions.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Prediction:
    """One generated answer: ``index`` is the sample's position in the evaluation set, ``ref`` its file:line;
    ``prompt`` is the conversation before the answer as text (not the chat-template rendering, so that runs
    of models with different templates can be compared); ``scores`` are on 0–100."""

    index: int
    ref: str
    prompt: str
    reference: str
    prediction: str
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResults:
    """The summary of one evaluation run (see the module docstring for the file)."""

    model: str
    adapter: str | None
    dataset: list[str]
    n_samples: int
    metrics: dict[str, float | None]
    generation: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    created: str = field(default_factory=_now)

    @property
    def label(self) -> str:
        """How reports name this run: the adapter when there is one, else the model."""
        return self.adapter or self.model

    def write(self, out_dir: Path, predictions: Iterable[Prediction] | None = None) -> list[Path]:
        """Write ``out_dir``/eval_results.json, and generated_predictions.jsonl when ``predictions`` are given.

        The predictions go first: an eval_results.json on disk means its predictions file is complete.
        Returns the files written.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        if predictions is not None:
            written.append(write_predictions(out_dir / PREDICTIONS_FILE, predictions))
        record = asdict(self)
        record["metrics"] = {k: v if v is not None and math.isfinite(v) else None for k, v in self.metrics.items()}
        written.append(atomic_write(out_dir / RESULTS_FILE, json.dumps(record, ensure_ascii=False, indent=1) + "\n"))
        return written

    @classmethod
    def read(cls, path: Path | str) -> EvalResults:
        """Read an eval_results.json, given it or its directory; SftlabError naming the file when missing or malformed."""
        path = results_path(path)
        data = _load(path)
        try:
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            results = cls(
                model=_typed(data, "model", str),
                adapter=_typed(data, "adapter", (str, type(None))),
                dataset=_typed(data, "dataset", list),
                n_samples=_typed(data, "n_samples", int),
                metrics=_typed(data, "metrics", dict),
                generation=_typed(data, "generation", (dict, type(None)), None),
                latency=_typed(data, "latency", (dict, type(None)), None),
                created=_typed(data, "created", str, ""),
            )
            for name, value in results.metrics.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"metric {name!r} is {value!r}, not a number")
            if not all(isinstance(d, str) for d in results.dataset):
                raise ValueError("'dataset' must be a list of paths")
        except ValueError as e:
            raise SftlabError(f"{path}: not a valid {RESULTS_FILE} ({e}); re-run sftlab eval to write it again") from None
        results.metrics = {k: float(v) if v is not None else None for k, v in results.metrics.items()}
        return results


def results_path(path: Path | str) -> Path:
    """The eval_results.json that ``path`` names: the file itself, or the one in the directory ``path``."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def predictions_path(path: Path | str) -> Path:
    """The generated_predictions.jsonl for ``path``: itself if it is one, else the one in its directory / beside its eval_results.json."""
    path = Path(path)
    if path.is_dir():
        return path / PREDICTIONS_FILE
    return path if path.suffix == ".jsonl" else path.with_name(PREDICTIONS_FILE)


def read_predictions(path: Path | str, missing_ok: bool = False) -> list[Prediction] | None:
    """Read the predictions of a run (``path``: its directory, eval_results.json or the .jsonl itself).

    None when the file does not exist and ``missing_ok`` (an eval without generation writes none);
    otherwise SftlabError naming the file (and line) when it is missing or malformed.
    """
    path = predictions_path(path)
    if missing_ok and not path.exists():
        return None
    text = _read_text(path)
    predictions = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            scores = _typed(data, "scores", dict, {})
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
                raise ValueError("'scores' must map names to numbers")
            predictions.append(Prediction(
                index=_typed(data, "index", int), ref=_typed(data, "ref", str), prompt=_typed(data, "prompt", str),
                reference=_typed(data, "reference", str), prediction=_typed(data, "prediction", str),
                scores={k: float(v) for k, v in scores.items()},
            ))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise SftlabError(f"{path}:{lineno}: not a valid prediction line ({e}); re-run sftlab eval to write it again") from None
    return predictions


_REQUIRED = object()


def _typed(data: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    if key not in data:
        if default is _REQUIRED:
            raise ValueError(f"missing {key!r}")
        return default
    value = data[key]
    # bool is an int in Python, but true is not a count
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise ValueError(f"{key!r} is {type(value).__name__}, expected {_names(types)}")
    return value


def _names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SftlabError(f"{path}: no such file; give a directory written by sftlab eval (or its {RESULTS_FILE})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SftlabError(f"{path}: cannot read it ({e})") from None


def _load(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except ValueError as e:
        raise SftlabError(f"{path}: not valid JSON ({e}); re-run sftlab eval to write it again") from None


def write_predictions(path: Path, predictions: Iterable[Prediction]) -> Path:
    """One JSON line per prediction, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in predictions))


