"""The web UI's own words, one dict per language (config keys and their help stay as declared, in English)."""

LABELS = {
    "en": {
        "tab_data": "Data", "tab_train": "Train", "tab_chat": "Chat", "tab_eval": "Evaluate", "tab_export": "Export",
        "dataset": "dataset", "dataset_info": "A dataset_info.json name or a data file (empty: the Train tab's).",
        "model": "model", "model_info": "Its tokenizer and chat template render the samples (empty: the Train tab's).",
        "n": "samples to show", "check": "check", "stats": "stats", "preview": "preview",
        "load_yaml": "load YAML", "load_yaml_info": "A training config; the form shows it, and keys not in the form keep its values.",
        "load": "load", "save_to": "save YAML to", "preview_yaml": "preview YAML", "save_yaml": "save YAML",
        "start": "start", "resume": "resume", "stop": "stop", "config": "config", "log": "log",
        "which_info": "trained: the run's output_dir (adapter or model); base: model_name_or_path; export: export_dir (Export tab).",
        "message": "message", "send": "send", "clear": "clear",
        "eval_intro": "`sftlab eval` on the config's validation split (`val_size`), in a separate process.",
        "generate": "generate and score", "baseline": "baseline", "baseline_info": "Also evaluate the base model and compare before → after.",
        "evaluate": "evaluate", "output": "output",
        "export_intro": "`sftlab export`: merge the run's LoRA adapter into the base weights, in a separate process.",
        "export": "export",
    },
    "zh": {
        "tab_data": "数据", "tab_train": "训练", "tab_chat": "对话", "tab_eval": "评估", "tab_export": "导出",
        "dataset": "数据集", "dataset_info": "dataset_info.json 中的名称或数据文件（留空：使用训练页的设置）。",
        "model": "模型", "model_info": "用它的分词器和对话模板渲染样本（留空：使用训练页的设置）。",
        "n": "显示样本数", "check": "检查", "stats": "统计", "preview": "预览",
        "load_yaml": "加载 YAML", "load_yaml_info": "训练配置文件；表单显示其内容，表单外的键保留文件中的值。",
        "load": "加载", "save_to": "YAML 保存到", "preview_yaml": "预览 YAML", "save_yaml": "保存 YAML",
        "start": "开始", "resume": "继续", "stop": "停止", "config": "配置", "log": "日志",
        "which_info": "trained：本次运行的 output_dir（适配器或模型）；base：model_name_or_path；export：export_dir（导出页）。",
        "message": "消息", "send": "发送", "clear": "清空",
        "eval_intro": "在配置的验证集（`val_size`）上运行 `sftlab eval`（独立进程）。",
        "generate": "生成并打分", "baseline": "基线", "baseline_info": "同时评估基础模型，并对比训练前后。",
        "evaluate": "评估", "output": "输出",
        "export_intro": "`sftlab export`：把 LoRA 适配器合并进基础权重（独立进程）。",
        "export": "导出",
    },
}
LANGUAGES = {"English": "en", "中文": "zh"}

