"""``sftlab eval``: the tuned model (and, for a before → after, the base model first) evaluated on the same samples,
each into its own folder, and the two compared."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from sftlab.config import SFTConfig
from sftlab.data.pipeline import build_data
from sftlab.evaluate.compare import Comparison
from sftlab.evaluate.comparison import compare_dirs
from sftlab.evaluate.results import EvalResults
from sftlab.evaluate.run import Sample, evaluate, measure_latency, questions, samples_from_datasets, samples_from_refs
from sftlab.infer.generate import load_trained, prompt_ids
from sftlab.model.load import Trained, inference_tokenizer, trained_from_config

# progress(total, what) → a context that yields the callback counting finished samples (or None)
Progress = Callable[[int, str], ContextManager[Callable[[int], None] | None]]


@dataclass(frozen=True)
class EvalRun:
    """One evaluated model: ``which`` ("base" or "tuned"), what was loaded, where its results were written."""

    which: str
    trained: Trained
    out_dir: Path
    results: EvalResults


def eval_samples(cfg: SFTConfig, trained: Trained, validation: bool, max_samples: int | None = None) -> tuple[list[Sample], list[str]]:
    """(samples, dataset names): the evaluation set training used (``validation``: cfg.eval_dataset, else the split it
    held out of cfg.dataset, rebuilt with ``trained``'s tokenizer as training split it; cfg.max_samples applies as in
    training, and ``max_samples`` keeps the first that many), else the first ``max_samples`` (default
    cfg.max_samples) of each of cfg.dataset."""
    if validation:
        data = build_data(cfg, inference_tokenizer(trained, cfg.trust_remote_code))
        split = "" if cfg.eval_dataset else " (validation split)"
        refs = data.eval_refs[:max_samples] if max_samples else data.eval_refs
        return samples_from_refs(data.eval_names, cfg.dataset_dir, refs), [f"{', '.join(data.eval_names)}{split}"]
    return samples_from_datasets(cfg.dataset, cfg.dataset_dir, max_samples or cfg.max_samples), list(cfg.dataset)


def evaluate_runs(cfg: SFTConfig, trained: Trained, out: Path, *, from_config: bool, validation: bool, baseline: bool = False,
                  latency: bool = False, max_samples: int | None = None, progress: Progress | None = None,
                  on_run: Callable[[EvalRun], None] | None = None) -> tuple[Comparison, list[Path]] | None:
    """Evaluate ``trained`` on ``eval_samples`` into ``out`` (eval_results.json, and the predictions when
    cfg.predict_with_generate); ``latency`` also times generation.

    With ``baseline`` the base model goes first, into OUT_baseline: the config's model_name_or_path
    (``from_config``), else ``trained`` without its adapter. Then the two are compared into the folder beside
    (OUTPUT_DIR/eval → OUTPUT_DIR/compare, as training writes it; X → X_compare) and (comparison, files) is
    returned; without ``baseline``, None. ``on_run`` is called as each model's results are written.
    Raises SftlabError for an empty evaluation set, or a model that is not there.
    """
    samples, names = eval_samples(cfg, trained, validation, max_samples)
    runs = [("tuned", trained, out)]
    if baseline:
        base = trained_from_config(cfg, tuned=False) if from_config else replace(trained, adapter_dir=None, tokenizer_dir=trained.model_dir)
        runs.insert(0, ("base", base, out.with_name(out.name + "_baseline")))
    done = []
    for which, what, where in runs:
        done.append(_evaluate_one(cfg, which, what, where, samples, names, latency, progress or _no_progress))
        if on_run is not None:
            on_run(done[-1])
    if not baseline:
        return None
    return compare_dirs(done[0].out_dir, done[1].out_dir, out.with_name("compare" if out.name == "eval" else f"{out.name}_compare"))


def _evaluate_one(cfg: SFTConfig, which: str, what: Trained, where: Path, samples: Sequence[Sample], names: list[str],
                  latency: bool, progress: Progress) -> EvalRun:
    model, tokenizer = load_trained(what, cfg.trust_remote_code)
    with progress(len(samples) if cfg.predict_with_generate else 0, f"Generating ({which})") as on_batch:
        results, predictions = evaluate(model, tokenizer, samples, cfg, model_name=str(what.model_dir),
                                        adapter=str(what.adapter_dir) if what.adapter_dir else None, datasets=names,
                                        with_generation=cfg.predict_with_generate, scorers=cfg.eval_scorers,
                                        batch_size=cfg.per_device_eval_batch_size, on_batch=on_batch)
    if latency:
        asked, _ = questions(samples[:1], cfg.default_system)
        results.latency = measure_latency(model, tokenizer, prompt_ids(tokenizer, asked[0].messages))
    results.write(where, predictions or None)
    return EvalRun(which, what, where, results)


def _no_progress(total: int, what: str) -> ContextManager[None]:
    return nullcontext()
