"""The offline SmolLM2 asset: GGUF → a normal safetensors model directory, once, atomically."""

import json

import pytest

from conftest import SMOL_ID

pytestmark = pytest.mark.slow


def test_gguf_is_converted_once_into_a_plain_model_dir(tmp_path, monkeypatch):
    from sftlab.model.assets import resolve_model

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    path = resolve_model(SMOL_ID)
    assert path.parent == tmp_path / "models"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [path.name]  # no temporary leftovers
    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_model(SMOL_ID) == path and (path / "model.safetensors").stat().st_mtime == mtime


def test_unknown_model_name_is_a_clear_error():
    from sftlab.errors import SftlabError
    from sftlab.model.assets import resolve_model

    with pytest.raises(SftlabError, match="no such directory or file"):
        resolve_model("./nowhere/model")
