"""The Gradio app behind ``sftlab webui``: data, train, chat, evaluate and export tabs over what the CLI verbs run.

The form's defaults and help come from ``SFTConfig.model_fields`` (no second copy). Training, evaluation and export
run as ``sftlab`` child processes (``webui.jobs``); the chat tab holds the one model it talks to.
"""

from __future__ import annotations

import functools
import html
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, get_args, get_origin

from sftlab.config import SFTConfig, dump_config, load_config
from sftlab.errors import SftlabError
from sftlab.files import atomic_write
from sftlab.webui.jobs import Job, cli_run, job_state, latest_job, log_tail, start_job, stop_job
from sftlab.webui.labels import LABELS, LANGUAGES

# The keys the Train tab shows; every other key comes from the loaded YAML (or its default).
FORM_KEYS = (
    "model_name_or_path", "template", "dataset", "dataset_dir", "cutoff_len", "val_size",
    "finetuning_type", "lora_rank", "learning_rate", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "bf16",
    "logging_steps", "eval_steps", "save_steps", "output_dir", "overwrite_output_dir",
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
TRAINED = "#b7e4c7"  # background of trained tokens in the preview


# -- the form: one declaration (SFTConfig) → widgets, YAML, overrides ------------------------------------


@dataclass(frozen=True)
class FormField:
    """What the form shows for one config key, read from its declaration."""

    key: str
    kind: Literal["choice", "check", "text"]
    default: Any  # None for a required key
    help: str
    choices: tuple[str, ...] = ()


def form_field(key: str) -> FormField:
    field = SFTConfig.model_fields[key]
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if get_origin(field.annotation) is Literal:
        return FormField(key, "choice", default, field.description, tuple(get_args(field.annotation)))
    return FormField(key, "check" if field.annotation is bool else "text", default, field.description)


def shown(value: Any) -> Any:
    """A config value as the form shows it: check boxes hold booleans, text boxes strings (lists comma-separated)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def form_overrides(values: dict[str, Any]) -> list[str]:
    """Form values → ``key=value`` overrides (read as YAML by load_config, as on the command line). Empty boxes
    are left out: the YAML's value, else the default, stands."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(f"{key}={str(value).lower()}")
        elif value is not None and str(value).strip():
            out.append(f"{key}={str(value).strip()}")
    return out


def resolve_config(yaml_path: str | None, values: dict[str, Any], **given: Any) -> SFTConfig:
    """The config the form describes: the YAML at ``yaml_path`` (if any), the form on top, ``given`` on top of that."""
    path = (yaml_path or "").strip() or None
    return load_config(path, form_overrides(values), **{k: v for k, v in given.items() if v not in (None, "")})


# -- the Train tab's run view --------------------------------------------------------------------------


def curves(records: list[dict]):
    """(loss frame, lr frame) for the plots: loss in long format (step, value, series), lr as (step, lr)."""
    import pandas as pd

    loss = [(r["step"], r[k], k) for r in records for k in ("loss", "eval_loss") if isinstance(r.get(k), (int, float))]
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    # lr typed even when empty: Gradio's plot otherwise draws it on a categorical axis, in data order
    return (pd.DataFrame(loss, columns=["step", "value", "series"]),
            pd.DataFrame(lr, columns=["step", "lr"]).astype({"step": "int64", "lr": "float64"}))


@functools.lru_cache(maxsize=4)
def _read_run(output_dir: str, stamp: tuple[int, int]) -> tuple[list[dict], str]:
    """(metrics records, the problem reading them); ``stamp`` (mtime, size) of metrics.jsonl keys the cache, so the
    page's once-a-second refresh reads the file again only when training wrote to it."""
    from sftlab.report.metrics import read_metrics

    metrics = Path(output_dir) / "metrics.jsonl"
    try:
        return (read_metrics(metrics) if metrics.is_file() else []), ""
    except SftlabError as e:
        return [], str(e)


@functools.lru_cache(maxsize=4)
def _diagnosis(output_dir: str, stamp: tuple[int, int]) -> str:
    """``sftlab report``'s diagnosis of the run, as Markdown."""
    from sftlab.report.diagnose import diagnose
    from sftlab.report.training_report import run_info

    records, _ = _read_run(output_dir, stamp)
    findings = diagnose(records, run_info(Path(output_dir), records))
    return "\n\n".join(f"**{f.severity}: {f.title}**  \n{f.evidence}  \nadvice: {f.advice}" for f in findings) \
        or "No problems found in the curves."


def run_view(job: Job | None) -> tuple[str, str, Any, Any, str]:
    """(status, log, loss frame, lr frame, diagnosis) of a job, read from its files."""
    if job is None:
        return "no run started yet", "", *curves([]), ""
    try:
        st = (Path(job.output_dir) / "metrics.jsonl").stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)
    records, problem = _read_run(job.output_dir, stamp)
    state = job_state(job, records)
    status = f"**{state}** · pid {job.pid} · `{job.output_dir}`"
    if records:
        last = records[-1]
        status += f" · step {last['step']}" + (f" · loss {last['loss']:.4f}" if isinstance(last.get("loss"), float) else "")
    status += f" · {len(records)} metrics records" + (f" · {problem}" if problem else "")
    diagnosis = _diagnosis(job.output_dir, stamp) if state != "running" and records else ""
    return status, log_tail(job.log), *curves(records), diagnosis


# -- data tab -------------------------------------------------------------------------------------------


def check_text(cfg: SFTConfig, max_errors: int = 20) -> str:
    from sftlab.data.check import check_sources
    from sftlab.data.sources import resolve_sources

    return "\n".join(check_sources(resolve_sources(cfg.dataset, cfg.dataset_dir), max_errors=max_errors).lines())


def stats_markdown(cfg: SFTConfig) -> str:
    """``sftlab data stats``'s summary (no report written) as Markdown: the token table, the summary lines, the advice."""
    from sftlab.data.stats import TABLE_COLUMNS, stats_for_config, summary_lines
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer

    s = stats_for_config(cfg, load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))).to_dict()
    headline, *lines = summary_lines(s)
    table = ["| tokens | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    table += [f"| {name} | " + " | ".join(str(row[k]) for k in TABLE_COLUMNS) + " |" for name, row in s["tokens"].items()]
    return "\n".join([headline, "", *table, "", *(f"{line}  " for line in lines), "", f"**{s['over_cutoff']['advice']}**"])


def preview_html(cfg: SFTConfig, n: int) -> str:
    """The first ``n`` samples as training sees them (``data preview``'s rows), trained tokens on a green background."""
    from sftlab.data.pipeline import preview_heading, preview_rows, preview_segments
    from sftlab.model.assets import resolve_model
    from sftlab.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg, resolve_model(cfg.model_name_or_path))
    warnings, rows = preview_rows(cfg, tokenizer, n)
    parts = [f"<p style='color:#b45309'>! {html.escape(w)}</p>" for w in warnings]
    for row in rows:
        parts.append(f"<h4>{html.escape(preview_heading(row))}</h4>")
        parts += [f"<p style='color:#b45309'>! {html.escape(w)}</p>" for w in row["warnings"]]
        spans = "".join(f"<span class='trained' style='background:{TRAINED}'>{html.escape(text)}</span>" if trained
                        else f"<span style='color:#666'>{html.escape(text)}</span>" for text, trained in preview_segments(row, tokenizer))
        parts.append(f"<pre class='sample' style='white-space:pre-wrap'>{spans}</pre>")
    return "\n".join(parts)


# -- chat tab --------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    """A chat message's text, whether Gradio gives a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "".join(_text(c) for c in content or [])


class Models:
    """The one model the chat tab holds (loaded on first use, replaced when another is picked)."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._loaded: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def get(self, trained, trust_remote_code: bool):
        from sftlab.infer.generate import load_trained

        with self._lock:
            weights = trained.adapter_dir or trained.model_dir  # retrained in place: load it again
            key = f"{trained.describe()} | {trained.template} | {max((p.stat().st_mtime_ns for p in weights.iterdir()), default=0)}"
            if key != self._key:
                self._loaded = None  # free the previous one first
                self._loaded, self._key = load_trained(trained, trust_remote_code), key
            return self._loaded


def which_model(cfg: SFTConfig, which: str):
    from sftlab.model.load import locate_trained, trained_from_config

    if which == "export":
        if not cfg.export_dir:
            raise SftlabError("no export_dir in the config: export first (sftlab export), or pick base / trained")
        return locate_trained(cfg.export_dir)
    return trained_from_config(cfg, tuned=which == "trained")


def chat_stream(models: Models, cfg: SFTConfig, which: str, history: list[dict], message: str) -> Iterator[list[dict]]:
    """The conversation with ``message`` added and the answer growing as it streams (stripped, as ``sftlab chat`` shows it)."""
    from sftlab.infer.generate import GenerationSettings, prompt_ids, stream

    model, tokenizer = models.get(which_model(cfg, which), cfg.trust_remote_code)
    past = [{"role": m["role"], "content": _text(m["content"])} for m in history]
    conversation = ([{"role": "system", "content": cfg.default_system}] if cfg.default_system else []) + past + \
        [{"role": "user", "content": message}]
    kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    shown_history = past + [{"role": "user", "content": message}]
    answer = ""
    yield shown_history + [{"role": "assistant", "content": "…"}]
    for piece in stream(model, tokenizer, prompt_ids(tokenizer, conversation, **kwargs), GenerationSettings.from_config(cfg)):
        answer += piece
        yield shown_history + [{"role": "assistant", "content": answer.strip() or "…"}]
    yield shown_history + [{"role": "assistant", "content": answer.strip()}]


# -- the app ---------------------------------------------------------------------------------------------


def _ui_errors(fn):
    """SftlabError (bad config, missing file, …) → a Gradio error toast with the one-line message."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except SftlabError as e:
            raise gr.Error(str(e)) from None

    return wrapped


def build_app():
    """The Blocks app; nothing is loaded until a button asks for it."""
    import gradio as gr

    fields = [form_field(k) for k in FORM_KEYS]
    models = Models()

    with gr.Blocks(title="sftlab") as demo:
        shown_in: list[tuple[Any, dict[str, str]]] = []  # (component, {attribute: label key}): what the language switch rewrites

        def tr(component, **keys: str):
            shown_in.append((component, keys))
            return component

        t = LABELS["en"]
        with gr.Row():
            gr.Markdown("# sftlab")
            lang = gr.Radio(list(LANGUAGES), value="English", show_label=False, container=False, elem_id="lang")
        with gr.Tabs():
            with tr(gr.Tab(t["tab_data"]), label="tab_data"):
                with gr.Row():
                    d_dataset = tr(gr.Textbox(label=t["dataset"], info=t["dataset_info"], elem_id="d_dataset"), label="dataset", info="dataset_info")
                    d_dir = gr.Textbox(label="dataset_dir", info=SFTConfig.model_fields["dataset_dir"].description, elem_id="d_dir")
                    d_model = tr(gr.Textbox(label=t["model"], info=t["model_info"], elem_id="d_model"), label="model", info="model_info")
                    d_n = tr(gr.Number(3, label=t["n"], precision=0, minimum=1), label="n")
                with gr.Row():
                    b_check = tr(gr.Button(t["check"], elem_id="b_check"), value="check")
                    b_stats = tr(gr.Button(t["stats"], elem_id="b_stats"), value="stats")
                    b_preview = tr(gr.Button(t["preview"], elem_id="b_preview"), value="preview")
                d_check = tr(gr.Code(label=t["check"], language=None, elem_id="d_check"), label="check")
                d_stats = gr.Markdown(elem_id="d_stats")
                d_preview = gr.HTML(elem_id="d_preview")
            with tr(gr.Tab(t["tab_train"]), label="tab_train"):
                with gr.Row():
                    yaml_path = tr(gr.Textbox(label=t["load_yaml"], info=t["load_yaml_info"], elem_id="yaml_path", scale=4),
                                   label="load_yaml", info="load_yaml_info")
                    b_load = tr(gr.Button(t["load"], elem_id="b_load", scale=1), value="load")
                widgets = []
                with gr.Row(equal_height=False):
                    for f in fields:  # labels are the YAML keys; help is the declaration's, in English
                        common = dict(label=f.key, info=f.help, elem_id=f"f_{f.key}", min_width=220)
                        if f.kind == "choice":
                            widgets.append(gr.Dropdown(list(f.choices), value=f.default, **common))
                        elif f.kind == "check":
                            widgets.append(gr.Checkbox(value=f.default, **common))
                        else:
                            widgets.append(gr.Textbox(value=shown(f.default), **common))
                with gr.Row():
                    save_path = tr(gr.Textbox(label=t["save_to"], value="train.yaml", elem_id="save_path", scale=3), label="save_to")
                    b_yaml = tr(gr.Button(t["preview_yaml"], elem_id="b_yaml"), value="preview_yaml")
                    b_save = tr(gr.Button(t["save_yaml"], elem_id="b_save"), value="save_yaml")
                    b_start = tr(gr.Button(t["start"], variant="primary", elem_id="b_start"), value="start")
                    b_resume = tr(gr.Button(t["resume"], elem_id="b_resume"), value="resume")
                    b_stop = tr(gr.Button(t["stop"], variant="stop", elem_id="b_stop"), value="stop")
                message = gr.Markdown(elem_id="message")
                yaml_view = tr(gr.Code(language="yaml", label=t["config"], elem_id="yaml_view"), label="config")
                status = gr.Markdown(elem_id="run_status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss / eval_loss", elem_id="loss_plot")
                    lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="lr_plot")
                diagnosis = gr.Markdown(elem_id="diagnosis")
                log = tr(gr.Code(label=t["log"], language=None, max_lines=30, elem_id="train_log"), label="log")
            with tr(gr.Tab(t["tab_chat"]), label="tab_chat"):
                which = tr(gr.Radio(["trained", "base", "export"], value="trained", label=t["model"], info=t["which_info"]),
                           label="model", info="which_info")
                chatbot = gr.Chatbot(elem_id="chatbot", height=380)
                with gr.Row():
                    chat_in = tr(gr.Textbox(label=t["message"], elem_id="chat_input", scale=4), label="message")
                    b_send = tr(gr.Button(t["send"], variant="primary", elem_id="b_send", scale=1), value="send")
                    b_clear = tr(gr.Button(t["clear"], elem_id="b_clear", scale=1), value="clear")
            with tr(gr.Tab(t["tab_eval"]), label="tab_eval"):
                tr(gr.Markdown(t["eval_intro"]), value="eval_intro")
                with gr.Row():
                    e_generate = tr(gr.Checkbox(False, label=t["generate"], info=SFTConfig.model_fields["predict_with_generate"].description),
                                    label="generate")
                    e_baseline = tr(gr.Checkbox(False, label=t["baseline"], info=t["baseline_info"]), label="baseline", info="baseline_info")
                    b_eval = tr(gr.Button(t["evaluate"], variant="primary", elem_id="b_eval"), value="evaluate")
                e_out = tr(gr.Code(label=t["output"], language=None, elem_id="eval_output"), label="output")
            with tr(gr.Tab(t["tab_export"]), label="tab_export"):
                tr(gr.Markdown(t["export_intro"]), value="export_intro")
                with gr.Row():
                    x_dir = gr.Textbox(label="export_dir", info=SFTConfig.model_fields["export_dir"].description, elem_id="x_dir", scale=3)
                    b_export = tr(gr.Button(t["export"], variant="primary", elem_id="b_export"), value="export")
                x_out = tr(gr.Code(label=t["output"], language=None, elem_id="export_output"), label="output")
        timer = gr.Timer(1.0)

        def relabel(language):
            words = LABELS[LANGUAGES[language]]
            return [gr.update(**{attr: words[key] for attr, key in keys.items()}) for _, keys in shown_in]

        lang.change(relabel, lang, [c for c, _ in shown_in])

        def config_of(path, *values):
            return resolve_config(path, dict(zip(FORM_KEYS, values)))

        @_ui_errors
        def load(path):
            cfg = load_config(path.strip())
            data = cfg.model_dump()
            return [shown(data[k]) for k in FORM_KEYS] + [dump_config(cfg), shown(cfg.export_dir)]

        @_ui_errors
        def preview_yaml(path, *values):
            return dump_config(config_of(path, *values))

        @_ui_errors
        def save_yaml(target, path, *values):
            text = dump_config(config_of(path, *values))
            return f"wrote {atomic_write(Path(target).expanduser(), text)}", text

        @_ui_errors
        def start(path, *values, resume=False):
            job = start_job(config_of(path, *values), resume=resume)
            return f"started `{' '.join(job.command[1:])}` (pid {job.pid}); log: `{job.log}`"

        @_ui_errors
        def stop():
            job = latest_job()
            return stop_job(job) if job else "no run started yet"

        def refresh():
            return run_view(latest_job())

        def data_config(dataset, dataset_dir, model, path, *values):
            return resolve_config(path, dict(zip(FORM_KEYS, values)), dataset=dataset.strip(), dataset_dir=dataset_dir.strip(),
                                  model_name_or_path=model.strip())

        @_ui_errors
        def check(*args):
            return check_text(data_config(*args))

        @_ui_errors
        def stats(*args):
            return stats_markdown(data_config(*args))

        @_ui_errors
        def preview(n, *args):
            return preview_html(data_config(*args), int(n or 3))

        def send(text, history, which_one, export_dir, path, *values):
            if not text.strip():
                yield history, ""
                return
            try:
                cfg = resolve_config(path, dict(zip(FORM_KEYS, values)), export_dir=export_dir.strip())
                for h in chat_stream(models, cfg, which_one, history or [], text):
                    yield h, ""
            except SftlabError as e:
                raise gr.Error(str(e)) from None

        def evaluate(generate, baseline, path, *values):
            try:
                cfg = config_of(path, *values)
            except SftlabError as e:
                raise gr.Error(str(e)) from None
            yield from cli_run("eval", cfg, ["--generate"] * bool(generate) + ["--baseline"] * bool(baseline))

        def export(target, path, *values):
            try:
                cfg = resolve_config(path, dict(zip(FORM_KEYS, values)), export_dir=target.strip())
            except SftlabError as e:
                raise gr.Error(str(e)) from None
            if not cfg.export_dir:
                raise gr.Error("no export_dir: fill it in, or set it in the config")
            yield from cli_run("export", cfg)

        form = [yaml_path, *widgets]
        data_in = [d_dataset, d_dir, d_model, *form]
        run_out = [status, log, loss_plot, lr_plot, diagnosis]
        b_load.click(load, yaml_path, [*widgets, yaml_view, x_dir])
        yaml_path.submit(load, yaml_path, [*widgets, yaml_view, x_dir])
        b_yaml.click(preview_yaml, form, yaml_view)
        b_save.click(save_yaml, [save_path, *form], [message, yaml_view])
        b_start.click(start, form, message).then(refresh, None, run_out)
        b_resume.click(functools.partial(start, resume=True), form, message).then(refresh, None, run_out)
        b_stop.click(stop, None, message)
        timer.tick(refresh, None, run_out, show_progress="hidden")
        demo.load(refresh, None, run_out)
        b_check.click(check, data_in, d_check)
        b_stats.click(stats, data_in, d_stats)
        b_preview.click(preview, [d_n, *data_in], d_preview)
        b_send.click(send, [chat_in, chatbot, which, x_dir, *form], [chatbot, chat_in])
        chat_in.submit(send, [chat_in, chatbot, which, x_dir, *form], [chatbot, chat_in])
        b_clear.click(lambda: ([], ""), None, [chatbot, chat_in])
        b_eval.click(evaluate, [e_generate, e_baseline, *form], e_out)
        b_export.click(export, [x_dir, *form], x_out)
    return demo


def check_bind(host: str, auth: str | None) -> tuple[str, str] | None:
    """``--auth user:password`` → (user, password). Raises SftlabError for a non-local host without it."""
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise SftlabError("--auth takes user:password")
        return user, password
    if host not in LOCAL_HOSTS:
        raise SftlabError(f"--host {host} exposes the UI (and training, chat and file paths) beyond this machine: add --auth user:password")
    return None


def launch(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> None:
    credentials = check_bind(host, auth)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing reaches the network
    build_app().queue().launch(server_name=host, server_port=port, auth=credentials, share=False, ssr_mode=False,
                               show_error=True, quiet=False)
