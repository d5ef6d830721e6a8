"""``do_predict``: the evaluation set answered by a model, into LLaMA-Factory's two files in output_dir.

``generated_predictions.jsonl``, one line per answered sample, in sample order, as LLaMA-Factory's
``CustomSeq2SeqTrainer.save_predictions`` writes it (its field names, ``ensure_ascii=False``)::

    {"prompt": <the prompt as the chat template renders it, generation prompt included>,
     "predict": <the generated answer>, "label": <the reference answer>}

``predict_results.json``, the keys LLaMA-Factory's ``log_metrics("predict")`` saves with predict_with_generate::

    {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
     "predict_runtime", "predict_samples_per_second", "predict_steps_per_second"}

The scores are sftlab's own (``evaluate/metrics.py::score``, the corpus values ``sftlab eval`` writes), on
LLaMA-Factory's 0–100 scale; their tokenisation differs from LLaMA-Factory's (see docs/evaluate.md). Both files
are written atomically, the predictions first: a predict_results.json on disk means its predictions are complete.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

from sftlab.config import SFTConfig
from sftlab.data.render import render
from sftlab.evaluate.metrics import Scores
from sftlab.evaluate.results import PREDICTIONS_FILE
from sftlab.evaluate.run import Question, answer_and_score, samples_from_refs, template_kwargs
from sftlab.files import atomic_write
from sftlab.infer.generate import GenerationSettings
from sftlab.model.load import Trained, load_for_inference, trained_from_config

log = logging.getLogger(__name__)

PREDICT_RESULTS_FILE = "predict_results.json"
_SCORES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")  # the scores LLaMA-Factory's ComputeSimilarity reports


def predict_split(cfg: SFTConfig, model, tokenizer, names: Sequence[str], refs: Sequence[str], out_dir: Path,
                  write: bool = True) -> dict[str, float] | None:
    """Answer the rows ``refs`` of the datasets ``names`` with ``model`` (greedy or sampled as the config says) and
    write the two files into ``out_dir``; returns predict_results (``write=False``: a rank taking part in a sharded
    generation writes nothing and gets None). Raises SftlabError when no sample can be answered."""
    samples = samples_from_refs(names, cfg.dataset_dir, refs)
    log.info("predicting: answering the %d samples of %s…", len(samples), ", ".join(names))
    batch_size = cfg.per_device_eval_batch_size
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        asked, answers, scored = answer_and_score(model, tokenizer, samples, cfg, GenerationSettings.from_config(cfg),
                                                  batch_size=batch_size)
    finally:
        model.train(was_training)
    runtime = time.perf_counter() - started
    if not write:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = prediction_lines(tokenizer, asked, answers, cfg)
    atomic_write(out_dir / PREDICTIONS_FILE, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    results = predict_results(scored, runtime, len(asked), math.ceil(len(asked) / batch_size))
    atomic_write(out_dir / PREDICT_RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    log.info("predict: %s (%.0f s) → %s", ", ".join(f"{k} {v:.4g}" for k, v in results.items() if k[8:] in _SCORES),
             runtime, out_dir / PREDICTIONS_FILE)
    return results


def prediction_lines(tokenizer, asked: Sequence[Question], answers: Sequence[str], cfg: SFTConfig) -> list[dict[str, str]]:
    """One {"prompt", "predict", "label"} per question: the prompt rendered as the model saw it (LLaMA-Factory
    decodes the prompt's tokens with the special tokens kept, which is the same text)."""
    return [{"prompt": render(tokenizer, q.messages, add_generation_prompt=True, **template_kwargs(cfg)), "predict": a,
             "label": q.reference} for q, a in zip(asked, answers)]


def predict_results(scored: Scores, runtime: float, samples: int, steps: int) -> dict[str, float]:
    """LLaMA-Factory's predict_results.json keys: the corpus scores (0–100) and the speed, rounded as the
    Hugging Face Trainer's ``speed_metrics`` rounds them (runtime 4 decimals, rates 3)."""
    out = {f"predict_{k}": scored.corpus[k] for k in _SCORES}
    runtime = max(runtime, 1e-9)
    out.update(predict_runtime=round(runtime, 4), predict_samples_per_second=round(samples / runtime, 3),
               predict_steps_per_second=round(steps / runtime, 3))
    return out


def predict_untrained(cfg: SFTConfig, names: Sequence[str], refs: Sequence[str], out_dir: Path, device) -> dict[str, float]:
    """A run that does not train (do_train false): ``predict_model(cfg)`` loaded on ``device`` answers the evaluation
    set into ``out_dir``. Raises SftlabError when the model or an adapter is not there."""
    trained = predict_model(cfg)
    log.info("predicting with %s", trained.describe())
    model, tokenizer = load_for_inference(trained, device, trust_remote_code=cfg.trust_remote_code)
    return predict_split(cfg, model, tokenizer, names, refs, out_dir)


def predict_model(cfg: SFTConfig) -> Trained:
    """What a run that does not train answers with, as LLaMA-Factory's predict YAML loads it: model_name_or_path,
    with adapter_name_or_path on top when set (the last adapter applied, the others merged first: what
    ``sftlab eval``/``predict`` load for the same config). Needs the run's config.yaml (do_train: false) written first,
    so that output_dir is not taken for a run that trained from those adapters."""
    return trained_from_config(cfg, tuned=bool(cfg.adapter_name_or_path))
