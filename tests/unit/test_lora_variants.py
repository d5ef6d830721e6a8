"""LoRA variants on a tiny model, as LLaMA-Factory means them: DoRA, rsLoRA, PiSSA (converted to a plain LoRA on the
unchanged base), additional_target (modules_to_save), and training from adapters (continued, or merged and a new one
trained); each trains, resumes, reloads for eval exactly as trained, and exports through the logit check."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_and_resume, write_config
from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.evaluate.results import EvalResults
from sftlab.evaluate.runs import evaluate_runs
from sftlab.export.merge import export_model
from sftlab.model.load import adapter_plan, load_for_inference, load_model, locate_trained, trained_from_config
from sftlab.model.loss import TokenLoss
from sftlab.train.checkpoint import load_weights, saved_keys
from sftlab.train.run import run_training

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 17, 230, 4021, 9, 77, 310, 2]])  # any tokens: logits are compared, not answers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(alpaca_rows_file) -> Path:
    return alpaca_rows_file


def _config(path: Path, model_dir: Path, data: Path, **over) -> Path:
    values = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(path / "out"), max_steps=3,
                  per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-2, save_steps=2, lora_rank=4,
                  cutoff_len=128, val_size=2, plot_loss=False)
    values.update(over)
    path.mkdir(parents=True, exist_ok=True)
    return write_config(path / "config.yaml", **values)


def _train(path: Path, model_dir: Path, data: Path, **over):
    cfg = load_config(_config(path, model_dir, data, **over))
    run_training(cfg)
    return cfg


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def _reloaded_eval_loss(cfg, trained, validation: bool = True) -> float:
    """What `sftlab eval` measures: the model loaded from disk (``trained``), on the validation split or the data file."""
    out = Path(tempfile.mkdtemp(prefix="eval-", dir=Path(cfg.output_dir).parent)) / "eval"
    evaluate_runs(cfg, trained, out, from_config=True, validation=validation)
    return EvalResults.read(out).metrics["eval_loss"]


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=IDS).logits.float()


def _adapter(cfg) -> tuple[dict, dict]:
    out = Path(cfg.output_dir)
    return load_file(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def dora(tmp_path_factory, tiny_model_dir, data):
    return _train(tmp_path_factory.mktemp("dora"), tiny_model_dir, data, use_dora=True)


@pytest.fixture(scope="module")
def rslora_extra(tmp_path_factory, tiny_model_dir, data):
    return _train(tmp_path_factory.mktemp("rs"), tiny_model_dir, data, use_rslora=True, additional_target="embed_tokens,lm_head")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir, data):
    """A plain LoRA trained on the whole file (no validation split), to train from."""
    return _train(tmp_path_factory.mktemp("plain"), tiny_model_dir, data, val_size=0, max_steps=4)


# ---------------------------------------------------------------- DoRA, rsLoRA, additional_target


def test_dora_adds_magnitude_vectors_that_train(dora, tiny_model_dir):
    model = load_model(dora, tiny_model_dir, CPU)
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    weights, config = _adapter(dora)
    assert config["use_dora"] is True
    saved = {k: v for k, v in weights.items() if k.endswith("lora_magnitude_vector")}
    assert len(saved) == len(magnitudes)
    # DoRA starts each magnitude at the row norms of its weight; training moved them
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    key = next(k for k in saved if "q_proj" in k)
    start = base[key.removeprefix("base_model.model.").replace("lora_magnitude_vector", "weight")].norm(dim=1)
    assert not torch.allclose(saved[key], start, atol=1e-4)


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(tmp_path, tiny_model_dir, data):
    def scalings(**over):
        model = load_model(load_config(_config(tmp_path, tiny_model_dir, data, lora_rank=4, lora_alpha=8, **over)), tiny_model_dir, CPU)
        from peft.tuners.lora import LoraLayer

        return {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}

    assert scalings(use_rslora=True) == {8 / 4 ** 0.5}
    assert scalings() == {8 / 4}


def test_additional_target_trains_and_saves_the_named_modules(rslora_extra, tiny_model_dir):
    weights, config = _adapter(rslora_extra)
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"] and config["use_rslora"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        saved = weights[f"base_model.model.{name}"]
        assert saved.shape == base["model.embed_tokens.weight"].shape
        assert not torch.equal(saved, base["model.embed_tokens.weight"])  # trained (tied in the base: one matrix)
    # eval loads it as trained
    final = [r["eval_loss"] for r in _metrics(rslora_extra) if "eval_loss" in r][-1]
    assert _reloaded_eval_loss(rslora_extra, trained_from_config(rslora_extra)) == pytest.approx(final, rel=1e-5)


def test_unknown_additional_target_names_the_models_modules(tmp_path, tiny_model_dir, data):
    cfg = load_config(_config(tmp_path, tiny_model_dir, data, additional_target="embed_tokens,wte"))
    with pytest.raises(SftlabError, match=r"additional_target: wte not in this model; its modules are .*embed_tokens.*lm_head"):
        load_model(cfg, tiny_model_dir, CPU)


@pytest.mark.parametrize("over, message", [
    (dict(pissa_init=True), "pissa_init: true needs pissa_convert: true"),
    (dict(pissa_convert=True), "pissa_convert: true converts PiSSA adapters and pissa_init is false"),
    (dict(create_new_adapter=True), "create_new_adapter: true merges the adapters of adapter_name_or_path, and none is set"),
    (dict(use_dora=True, finetuning_type="full"), "use_dora: LoRA keys, and finetuning_type is full"),
])
def test_variant_keys_that_cannot_work_are_refused_naming_the_key(tmp_path, tiny_model_dir, data, over, message):
    with pytest.raises(SftlabError, match=message):
        load_model(load_config(_config(tmp_path, tiny_model_dir, data, **over)), tiny_model_dir, CPU)


def test_checkpoint_keys_map_dora_and_modules_to_save_as_peft_saves_them(dora, rslora_extra, tiny_model_dir):
    """FSDP and DeepSpeed load a checkpoint's adapter by these keys: they must be the saved file's, one for one."""
    for cfg in (dora, rslora_extra):
        module = TokenLoss(load_model(cfg, tiny_model_dir, CPU))
        keys = saved_keys(module, [n for n, p in module.named_parameters() if p.requires_grad])
        assert keys.keys() == _adapter(cfg)[0].keys()
        assert len(set(keys.values())) == len(keys)


# ---------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("pissa_iter", [-1, 4])
def test_pissa_initial_model_gives_the_base_models_logits(tmp_path, tiny_model_dir, data, pissa_iter):
    cfg = load_config(_config(tmp_path, tiny_model_dir, data, pissa_init=True, pissa_convert=True, pissa_iter=pissa_iter))
    model = load_model(cfg, tiny_model_dir, CPU)
    b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    assert b.abs().max() > 0  # PiSSA starts from the singular vectors, not from B = 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert (_logits(model) - _logits(base)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def pissa(tmp_path_factory, tiny_model_dir, data):
    return _train(tmp_path_factory.mktemp("pissa"), tiny_model_dir, data, pissa_init=True, pissa_convert=True,
                  use_dora=True, additional_target="embed_tokens")


def test_pissa_adapter_is_saved_converted_for_the_unchanged_base(pissa, tiny_model_dir):
    from accelerate.utils import set_seed

    weights, config = _adapter(pissa)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in weights) and "base_model.model.model.embed_tokens.weight" in weights
    # the trained model: PiSSA's residual base (initialised again as training did) + the last checkpoint's PiSSA form
    set_seed(pissa.seed)
    trained = load_model(pissa, tiny_model_dir, CPU)
    load_weights(Path(pissa.output_dir) / "checkpoint-3", trained)
    converted, _ = load_for_inference(trained_from_config(pissa))  # on the base as it is on disk
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    reference = _logits(trained)
    assert (reference - base).abs().max() > 1e-2  # the check below could not miss a dropped adapter
    assert (_logits(converted) - reference).abs().max() < 1e-4
    final = [r["eval_loss"] for r in _metrics(pissa) if "eval_loss" in r][-1]
    assert _reloaded_eval_loss(pissa, trained_from_config(pissa)) == pytest.approx(final, rel=1e-5)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("over", [dict(use_dora=True, use_rslora=True, additional_target="embed_tokens"),
                                  dict(pissa_init=True, pissa_convert=True)], ids=["dora-rslora-extra", "pissa"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, data, over):
    common = dict(max_steps=4, save_steps=2, eval_steps=2, **over)
    full, again = run_and_resume(lambda path, **values: _train(path, tiny_model_dir, data, **values), tmp_path, 2, **common)
    a, b = _metrics(full), _metrics(again)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b):
        for key in ("loss", "grad_norm", "eval_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    assert _adapter(full)[0].keys() == _adapter(again)[0].keys()
    for key, value in _adapter(full)[0].items():
        torch.testing.assert_close(_adapter(again)[0][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training from adapters


def test_continuing_an_adapter_starts_from_its_weights(tmp_path, tiny_model_dir, data, plain, caplog):
    start = _reloaded_eval_loss(plain, locate_trained(str(tiny_model_dir), plain.output_dir), validation=False)
    base = _reloaded_eval_loss(plain, trained_from_config(plain, tuned=False), validation=False)
    assert abs(start - base) > 1e-3 * base  # a fresh LoRA would start from the base's loss
    with caplog.at_level(logging.INFO, logger="sftlab"):
        cont = _train(tmp_path, tiny_model_dir, data, adapter_name_or_path=plain.output_dir, lora_rank=8, val_size=0,
                      per_device_train_batch_size=8, max_steps=2)
    # one step covers every sample: its loss is the continued adapter's loss on the file
    assert _metrics(cont)[0]["loss"] == pytest.approx(start, rel=1e-5)
    assert _adapter(cont)[1]["r"] == 4  # the adapter's rank, not the YAML's
    assert "continuing adapter" in caplog.text and "lora_rank 4 (YAML: 8)" in caplog.text
    trained = trained_from_config(cont)
    assert trained.adapter_dir == Path(cont.output_dir) and trained.merged == ()
    assert _reloaded_eval_loss(cont, trained, validation=False) < start


def test_create_new_adapter_merges_then_trains_a_fresh_one_that_reloads_as_trained(tmp_path, tiny_model_dir, data, plain):
    new = _train(tmp_path / "new", tiny_model_dir, data, adapter_name_or_path=plain.output_dir, create_new_adapter=True,
                 lora_rank=2, do_eval_baseline=True)
    merged_start = _reloaded_eval_loss(new, locate_trained(str(tiny_model_dir), plain.output_dir))
    assert abs(merged_start - _reloaded_eval_loss(plain.model_copy(update={"val_size": 2.0}), trained_from_config(plain, tuned=False))) > 1e-4
    # before training: the base with the old adapter merged, the new LoRA still zero
    assert EvalResults.read(Path(new.output_dir) / "eval_baseline").metrics["eval_loss"] == pytest.approx(merged_start, rel=1e-5)
    assert _adapter(new)[1]["r"] == 2
    trained = trained_from_config(new)
    assert trained.merged == (Path(plain.output_dir),) and trained.adapter_dir == Path(new.output_dir)
    final = [r["eval_loss"] for r in _metrics(new) if "eval_loss" in r][-1]
    assert _reloaded_eval_loss(new, trained) == pytest.approx(final, rel=1e-5)
    start = trained_from_config(new, tuned=False)  # what `sftlab eval --baseline` compares with: where training started
    assert start.merged == (Path(plain.output_dir),) and start.adapter_dir is None

    # continuing that adapter brings the adapter it was trained on, merged first, in training and after
    cont = _train(tmp_path / "cont", tiny_model_dir, data, adapter_name_or_path=new.output_dir, max_steps=1)
    assert adapter_plan(cont) == ([Path(plain.output_dir)], Path(new.output_dir))
    trained = trained_from_config(cont)
    assert trained.merged == (Path(plain.output_dir),) and trained.adapter_dir == Path(cont.output_dir)
    final = [r["eval_loss"] for r in _metrics(cont) if "eval_loss" in r][-1]
    assert _reloaded_eval_loss(cont, trained) == pytest.approx(final, rel=1e-5)


def test_several_adapters_merge_all_but_the_last(tmp_path, tiny_model_dir, data, plain, dora):
    both = f"{plain.output_dir},{dora.output_dir}"
    cfg = load_config(_config(tmp_path, tiny_model_dir, data, adapter_name_or_path=both))
    assert adapter_plan(cfg) == ([Path(plain.output_dir)], Path(dora.output_dir))
    assert adapter_plan(cfg.model_copy(update={"create_new_adapter": True})) == ([Path(plain.output_dir), Path(dora.output_dir)], None)


def test_an_inference_config_loads_the_adapters_it_names(tmp_path, tiny_model_dir, data, plain, dora):
    """LLaMA-Factory's inference/merge YAMLs name the adapter to load; nothing was trained into their output_dir."""
    cfg = load_config(_config(tmp_path, tiny_model_dir, data, adapter_name_or_path=f"{plain.output_dir},{dora.output_dir}"))
    trained = trained_from_config(cfg)
    assert trained.adapter_dir == Path(dora.output_dir) and trained.merged == (Path(plain.output_dir),)
    assert trained_from_config(cfg, tuned=False).adapter_dir is None


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("run", ["dora", "rslora_extra"])
def test_export_merges_the_variant_and_passes_the_logit_check(request, tmp_path, run):
    cfg = request.getfixturevalue(run)
    result = export_model(trained_from_config(cfg), tmp_path / "merged")
    assert result.merged and result.adapter_effect > 10 * result.tolerance
    assert result.max_abs_diff < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapter, _ = load_for_inference(trained_from_config(cfg))
    assert (_logits(reloaded) - _logits(adapter)).abs().max() < 1e-4


def test_export_of_a_run_trained_on_a_merged_adapter_merges_both(tmp_path, tiny_model_dir, data, plain):
    new = _train(tmp_path / "new", tiny_model_dir, data, adapter_name_or_path=plain.output_dir, create_new_adapter=True)
    result = export_model(trained_from_config(new), tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "export.json").read_text())["merged_before"] == [plain.output_dir]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapter, _ = load_for_inference(trained_from_config(new))
    assert (_logits(reloaded) - _logits(adapter)).abs().max() <= result.tolerance
