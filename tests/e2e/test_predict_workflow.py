"""LLaMA-Factory's train/predict workflow from one YAML, on a tiny model: do_train + do_predict with eval_dataset,
predicting only (with an adapter of an earlier run, or a predict YAML that names no dataset), the one-line errors
for impossible combinations, and the evaluation during training on eval_dataset."""

import json

import pytest
from typer.testing import CliRunner

from conftest import ALPACA_ROWS, sftlab_cli, write_config
from sftlab.cli import app
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.evaluate.workflow import check_steps, data_to_read, will_train
from sftlab.train.run import run_training

EVAL_ROWS = [
    {"instruction": "Say bye", "input": "", "output": "Bye!"},
    {"instruction": "2 plus 3?", "input": "", "output": "5"},
    {"instruction": "Colour of grass?", "input": "", "output": "Green"},
]
RESULT_KEYS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
               "predict_samples_per_second", "predict_steps_per_second"}
TINY = dict(lora_rank=4, cutoff_len=128, max_new_tokens=4, per_device_eval_batch_size=2, logging_steps=1, save_steps=100)


def _cli(*args, **kw):
    """The real console entry point, in a new process (how errors reach the user: one ``error:`` line)."""
    return sftlab_cli(*args, **kw)


def _invoke(*args):
    """The CLI in this process (no second import of torch): exit code 0 asserted."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict-data")
    train, test = tmp / "train.json", tmp / "test.json"
    train.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    test.write_text(json.dumps(EVAL_ROWS), encoding="utf-8")
    return train, test


@pytest.fixture(scope="module")
def trained_and_predicted(tmp_path_factory, tiny_model_dir, data_files):
    """A LoRA run on dataset, evaluated on eval_dataset every 3 steps, that answers eval_dataset at the end (6 steps at
    lr 1e-2: enough for the tiny model to answer more than the newlines its random weights give, stripped to "")."""
    train, test = data_files
    tmp = tmp_path_factory.mktemp("train-predict")
    cfg = write_config(tmp / "train.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(train), eval_dataset=str(test),
                       output_dir=str(tmp / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                       eval_steps=3, do_train=True, do_predict=True, predict_with_generate=True, **TINY)
    run_training(load_config(cfg))
    return tmp / "out"


def test_train_and_predict_writes_llamafactory_files(trained_and_predicted):
    out = trained_and_predicted
    assert (out / "adapter_model.safetensors").is_file()
    lines = _lines(out / "generated_predictions.jsonl")
    assert [set(line) for line in lines] == [{"prompt", "predict", "label"}] * len(EVAL_ROWS)
    assert [line["label"] for line in lines] == [r["output"] for r in EVAL_ROWS]  # in sample order
    assert all(line["prompt"].endswith("<|im_start|>assistant\n") and r["instruction"] in line["prompt"]  # rendered as the model saw it
               for line, r in zip(lines, EVAL_ROWS))
    results = json.loads((out / "predict_results.json").read_text(encoding="utf-8"))
    assert set(results) == RESULT_KEYS
    assert all(0 <= results[k] <= 100 for k in RESULT_KEYS if "rouge" in k or "bleu" in k)
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left


def test_train_with_eval_dataset_logs_eval_loss_every_eval_steps(trained_and_predicted):
    records = [json.loads(line) for line in (trained_and_predicted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]


def test_predict_only_with_an_adapter_matches_sftlab_predict(trained_and_predicted, tiny_model_dir, data_files, tmp_path):
    _, test = data_files
    cfg = write_config(tmp_path / "predict.yaml", model_name_or_path=str(tiny_model_dir), adapter_name_or_path=str(trained_and_predicted),
                       eval_dataset=str(test), output_dir=str(tmp_path / "pred"), do_train=False, do_predict=True,
                       predict_with_generate=True, **TINY)
    run_training(load_config(cfg))
    out = tmp_path / "pred"
    assert not (out / "adapter_model.safetensors").exists() and not (out / "metrics.jsonl").exists()  # nothing trained
    assert load_config(out / "config.yaml").do_train is False
    mine = [line["predict"] for line in _lines(out / "generated_predictions.jsonl")]
    # the config only for the generation settings; the model and adapter given as sftlab predict takes them
    _invoke("predict", str(cfg), "--model", str(tiny_model_dir), "--adapter", str(trained_and_predicted), "--dataset", str(test),
            "-o", str(tmp_path / "again.jsonl"))
    assert any(mine) and mine == [p["prediction"] for p in _lines(tmp_path / "again.jsonl")]  # greedy: the same answers


def test_llamafactory_predict_yaml_without_do_train_and_dataset_only_predicts(tiny_model_dir, data_files, tmp_path):
    _, test = data_files
    # as LLaMA-Factory's examples/extras/nlg_eval/llama3_lora_predict.yaml is written: no do_train, no dataset
    cfg = write_config(tmp_path / "predict.yaml", model_name_or_path=str(tiny_model_dir), stage="sft", do_predict=True,
                       finetuning_type="lora", eval_dataset=str(test), output_dir=str(tmp_path / "pred"),
                       overwrite_output_dir=True, predict_with_generate=True, **TINY)
    loaded = load_config(cfg)
    assert not will_train(loaded) and data_to_read(loaded) == [[str(test)]]
    _invoke("train", str(cfg))
    out = tmp_path / "pred"
    assert len(_lines(out / "generated_predictions.jsonl")) == len(EVAL_ROWS)
    assert set(json.loads((out / "predict_results.json").read_text())) == RESULT_KEYS
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("values, words", [
    (dict(do_predict=True, eval_dataset="test.json"), "predict_with_generate"),
    (dict(eval_dataset="test.json", val_size=1), "val_size"),
    (dict(do_predict=True, predict_with_generate=True), "eval_dataset"),  # nothing to answer
])
def test_impossible_combinations_are_one_line_errors_from_the_cli(tmp_path, tiny_model_dir, alpaca_file, values, words):
    (tmp_path / "test.json").write_text(json.dumps(EVAL_ROWS), encoding="utf-8")
    values = {k: str(tmp_path / v) if k == "eval_dataset" else v for k, v in values.items()}
    cfg = write_config(tmp_path / "bad.yaml", model_name_or_path=str(tiny_model_dir), dataset=str(alpaca_file),
                       output_dir=str(tmp_path / "out"), **values)
    with pytest.raises(SftlabError, match=words):
        check_steps(load_config(cfg))
    run = _cli("train", str(cfg))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1 and words in run.stderr
    assert not (tmp_path / "out").exists()  # said before anything ran


def test_training_with_only_eval_dataset_is_an_error(tmp_path, tiny_model_dir):
    (tmp_path / "test.json").write_text(json.dumps(EVAL_ROWS), encoding="utf-8")
    cfg = load_config(None, [], model_name_or_path=str(tiny_model_dir), eval_dataset=str(tmp_path / "test.json"),
                      output_dir=str(tmp_path / "out"))
    with pytest.raises(SftlabError, match="do_train: false"):
        check_steps(cfg)
