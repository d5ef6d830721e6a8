"""Find and load datasets: names in ``dataset_info.json`` or direct file paths, as Arrow datasets.

Loading goes through Hugging Face ``datasets`` (memory-mapped Arrow, cached), so a large file never
sits in Python lists. When a file fails to parse, it is re-read line by line only to name the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa

from sftlab.config import SFTConfig
from sftlab.data.formats import FORMATS, FormatSpec, detect_format
from sftlab.errors import SftlabError

_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}  # .txt: one text per line (stage pt)
TOKENIZED_MANIFEST = "sftlab_tokenized.json"  # in a tokenized_path directory: what encoded the sets saved beside it
# mix_strategy → datasets.interleave_datasets' stopping_strategy (LLaMA-Factory's mapping)
STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
            "interleave_once": "all_exhausted_without_replacement"}


@dataclass
class Source:
    """One dataset to read: its display name, files and format (None: detect from columns)."""

    name: str  # how samples are named in messages: the file, or the registered name of a folder
    files: list[Path]
    spec: FormatSpec | None
    num_samples: int | None = None


def resolve_sources(names: list[str], dataset_dir: str) -> list[Source]:
    """Dataset names → sources. Raises SftlabError for none, an unknown name or a bad dataset_info.json entry."""
    if not names:  # a config without data is fine for chat and export; whatever reads data needs some
        raise SftlabError("dataset is empty: name a dataset from dataset_info.json or a data file (dataset: in the config)")
    info_path = Path(dataset_dir) / "dataset_info.json"
    info: dict | None = None
    sources = []
    for name in names:
        path = Path(name).expanduser()
        if path.suffix in _LOADERS or path.is_dir() or path.is_file():
            files = _data_files(path, "dataset")
            sources.append(Source(str(files[0]) if len(files) == 1 else name, files, None))
            continue
        if info is None:
            info = read_dataset_info(info_path)
        if name not in info:
            known = ", ".join(sorted(info)) or "none"
            raise SftlabError(f"dataset '{name}': not in {info_path} (it has: {known}) and no such file")
        sources.append(_from_info(name, info[name], Path(dataset_dir), info_path))
    return sources


def source_files(sources: list[Source]) -> list[Path]:
    """Every file of ``sources``: what a command reading them must never write over (``files.check_outputs``)."""
    return [f for s in sources for f in s.files]


def dataset_names(value: str | list[str] | None) -> list[str]:
    """A dataset key's value (names or paths, comma-separated, or a list) as a list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [s.strip() for s in items if s.strip()]


def interleave_probs(cfg: SFTConfig, count: int, key: str) -> list[float] | None:
    """``interleave_probs`` as the probabilities of the ``count`` datasets named by ``key`` (dataset or eval_dataset);
    None when unset. Raises SftlabError (naming the key) for a value that is not one number per dataset, a negative
    one, a sum that is not 1, or probabilities with mix_strategy: concat."""
    if cfg.interleave_probs is None:
        return None
    if cfg.mix_strategy == "concat":
        raise SftlabError("interleave_probs is set but mix_strategy is concat (concatenation draws no samples); set "
                          "mix_strategy: interleave_under or interleave_over, or remove interleave_probs")
    raw = cfg.interleave_probs.split(",") if isinstance(cfg.interleave_probs, str) else cfg.interleave_probs
    try:
        probs = [float(p) for p in raw]
    except ValueError:
        raise SftlabError(f"interleave_probs {cfg.interleave_probs!r}: not numbers; give one probability per dataset, "
                          "e.g. 0.7,0.3") from None
    if len(probs) != count:
        raise SftlabError(f"interleave_probs has {len(probs)} value(s) for {count} dataset(s) in {key}; give one "
                          "probability per dataset, in the same order")
    if any(not p >= 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        raise SftlabError(f"interleave_probs {probs}: each must be >= 0 and together they must sum to 1 (they sum to "
                          f"{sum(probs):g})")
    return probs


def saved_tokenized(tokenized_path: str | None) -> Path | None:
    """The ``tokenized_path`` directory when it holds the sets a run saved there; None when it is unset, missing or
    empty (a run then saves its sets there). Raises SftlabError for a directory that holds anything else."""
    if tokenized_path is None:
        return None
    path = Path(tokenized_path).expanduser()
    if (path / TOKENIZED_MANIFEST).is_file():
        return path
    if path.is_dir() and any(path.iterdir()) or path.is_file():
        raise SftlabError(f"tokenized_path {path}: holds no data saved by sftlab ({TOKENIZED_MANIFEST} is missing), so it "
                          "cannot be checked against this tokenizer and template; point tokenized_path at a new or empty directory")
    return None


def read_dataset_info(info_path: Path) -> dict:
    """The entries of a dataset_info.json. Raises SftlabError (naming the line) if it is missing or not an object of entries."""
    if not info_path.is_file():
        raise SftlabError(f"{info_path}: not found; set dataset_dir to the folder with dataset_info.json, or give dataset as a file path")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SftlabError(f"{info_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(info, dict):
        raise SftlabError(f"{info_path}: expected an object mapping dataset names to entries")
    return info


def _from_info(name: str, entry: dict, dataset_dir: Path, info_path: Path) -> Source:
    where = f"{info_path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise SftlabError(f"{where}: expected an object with file_name")
    if "file_name" not in entry:
        remote = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry), None)
        if remote:
            raise SftlabError(f"{where}: '{remote}' datasets need the network; download it and set file_name")
        raise SftlabError(f"{where}: missing 'file_name'")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise SftlabError(f"{where}: unknown formatting '{formatting}'; use one of {', '.join(FORMATS)}")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if formatting == "sharegpt" and tags.get("role_tag") == "role":  # LLaMA-Factory's way of saying OpenAI format
        formatting = "openai"
    spec = FormatSpec(formatting, dict(columns), dict(tags))
    files = _data_files(dataset_dir / entry["file_name"], f"{where}: file_name")
    return Source(str(files[0]) if len(files) == 1 else name, files, spec, entry.get("num_samples"))


def _data_files(path: Path, what: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _LOADERS)
        if not files:
            raise SftlabError(f"{what}: folder {path} has no .json, .jsonl, .csv, .parquet or .txt files")
        return files
    if not path.is_file():
        raise SftlabError(f"{what}: {path} not found; check the path (relative paths start at the working directory)")
    if path.suffix not in _LOADERS:
        raise SftlabError(f"{what}: {path} is not .json, .jsonl, .csv, .parquet or .txt")
    return [path]


def load_source(source: Source) -> datasets.Dataset:
    """The source's rows as an Arrow dataset. Raises SftlabError naming the file (and line) on bad data."""
    loader = _LOADERS[source.files[0].suffix]
    if any(_LOADERS[f.suffix] != loader for f in source.files):
        raise SftlabError(f"dataset '{source.name}': mixes file types; use one type per dataset")
    for f in source.files:
        if f.stat().st_size == 0:
            raise SftlabError(f"{f}: the file is empty; add samples or remove it from dataset")
        if loader == "json":
            _refuse_leading_null(f)
    try:
        ds = datasets.load_dataset(loader, data_files=[str(f) for f in source.files], split="train")
    except Exception as e:  # pyarrow / datasets raise many types; find the offending line ourselves
        for f in source.files:
            _raise_parse_error(f)
        raise SftlabError(f"{source.files[0]}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if len(ds) == 0:
        raise SftlabError(f"{source.files[0]}: the dataset has no samples; add samples or remove it from dataset")
    try:
        ds.data.table.validate(full=True)  # pyarrow's JSON reader keeps bytes that are not UTF-8 in its string columns
    except pa.ArrowInvalid:
        for f in source.files:
            _raise_not_utf8(f)
        raise SftlabError(f"{source.files[0]}: holds text that is not UTF-8; re-save the file as UTF-8") from None
    return ds


def _refuse_leading_null(path: Path) -> None:
    """SftlabError for a JSON file whose first value is ``null``: pyarrow's JSON reader (26.0) crashes the whole
    process on one (a segmentation fault, not an exception), so it must never see it."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"null") and (len(text) == 4 or not text[4:5].isalnum()):
        line = head[: len(head) - len(text)].count(b"\n") + 1
        raise SftlabError(f"{path}:{line}: expected a JSON object (one sample), got null; remove that line")


def _raise_not_utf8(path: Path) -> None:
    """SftlabError naming the first line of ``path`` that is not UTF-8, if one is not."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SftlabError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line); re-save the file as UTF-8") from None


def _raise_parse_error(path: Path) -> None:
    if path.suffix not in (".json", ".jsonl"):
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SftlabError(f"{path}: the file is empty; add samples or remove it from dataset")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            raise SftlabError(f"{path}:{whole.lineno}: not valid JSON ({whole.msg}); fix that line") from None
    else:
        if document == [] or document == {}:
            raise SftlabError(f"{path}: the dataset has no samples; add samples or remove it from dataset")
        return  # a valid JSON document that datasets could not read: the caller reports why
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SftlabError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a JSONL file must be one JSON object") from None
        if not isinstance(row, dict):
            raise SftlabError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")


def format_of(source: Source, ds: datasets.Dataset) -> FormatSpec:
    """The source's declared format, or the one its columns show; checks required columns exist."""
    spec = source.spec or detect_format(ds.column_names, ds[0])
    if (spec is not None and spec.formatting == "alpaca" and spec.columns["response"] not in ds.column_names
            and spec.columns["prompt"] in ds.column_names):
        # LLaMA-Factory registers plain text for stage pt as alpaca data with only a prompt column (its c4_demo and
        # wiki_demo: "columns": {"prompt": "text"}): that column is the text
        spec = FormatSpec("text", {"prompt": spec.columns["prompt"]})
    if spec is None:
        raise SftlabError(
            f"{source.files[0]}: unknown data format (columns: {', '.join(ds.column_names)}); expected alpaca "
            "(instruction, output), sharegpt (conversations), openai (messages), prompt/completion or text, "
            "or register it in dataset_info.json with its columns"
        )
    missing = spec.missing_columns(ds.column_names)
    if missing:
        raise SftlabError(
            f"{source.files[0]}: {spec.formatting} data needs column(s) {', '.join(missing)} "
            f"but has {', '.join(ds.column_names)}; map them with 'columns' in dataset_info.json"
        )
    return spec
