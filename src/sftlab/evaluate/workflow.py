"""Which steps ``sftlab train`` runs for a config — train, predict, or only check the data — and the checks of the
keys that choose them, made before anything slow loads (LLaMA-Factory's do_train / do_predict workflow)."""

from __future__ import annotations

from sftlab.config import SFTConfig
from sftlab.data.sources import dataset_names, interleave_probs, saved_tokenized
from sftlab.errors import SftlabError


def will_train(cfg: SFTConfig) -> bool:
    """Whether the run trains: ``do_train``, except in a predict YAML that does not set it and names no dataset
    (LLaMA-Factory's do_train defaults to false, so its predict examples leave it out)."""
    implied_off = cfg.do_predict and "do_train" not in cfg.model_fields_set and not cfg.dataset
    return cfg.do_train and not implied_off


def check_steps(cfg: SFTConfig) -> None:
    """One-line SftlabError, naming the key, for a combination the run cannot do: do_predict without generation, on
    pt, or with nothing to answer; training with only eval_dataset named; eval_dataset with val_size; interleave_probs
    that do not fit the datasets."""
    saved = saved_tokenized(cfg.tokenized_path)
    eval_names = dataset_names(cfg.eval_dataset)
    if saved is None and eval_names and cfg.val_size > 0:
        raise SftlabError("eval_dataset and val_size are both set: eval_dataset is the evaluation set; remove val_size "
                          "(or eval_dataset to split dataset instead), as LLaMA-Factory requires")
    if saved is None and eval_names and not cfg.dataset and will_train(cfg):
        raise SftlabError("dataset is empty and the run trains (do_train: true): name the datasets to train on, "
                          "or set do_train: false (with do_predict: true) to only answer eval_dataset")
    if cfg.do_predict:
        if cfg.stage != "sft":
            raise SftlabError("do_predict: true answers chat samples; it needs stage: sft")
        if not cfg.predict_with_generate:
            raise SftlabError("do_predict: true needs predict_with_generate: true (the predictions are generated answers), "
                              "as LLaMA-Factory requires; set it")
        if saved is None and not eval_names and cfg.val_size <= 0:
            raise SftlabError("do_predict: true has no samples to answer: set eval_dataset (the datasets to answer) or "
                              "val_size (a validation split of dataset)")
    if saved is None:
        for names, key in ((cfg.dataset, "dataset"), (eval_names, "eval_dataset")):
            if len(names) > 1 or (key == "dataset" and names):
                interleave_probs(cfg, len(names), key)


def data_to_read(cfg: SFTConfig) -> list[list[str]]:
    """The dataset lists the run reads (for ``resolve_sources``, whose error for an empty list says to set dataset):
    none when tokenized_path holds saved sets; ``dataset`` when training or when set; ``eval_dataset`` when set."""
    if saved_tokenized(cfg.tokenized_path) is not None:
        return []
    eval_names = dataset_names(cfg.eval_dataset)
    return [names for names, read in ((cfg.dataset, will_train(cfg) or bool(cfg.dataset) or not eval_names),
                                      (eval_names, bool(eval_names))) if read]
