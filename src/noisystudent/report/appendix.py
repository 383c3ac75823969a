"""The report's last two sections: **Configuration** (the settings that shape the experiment, the
keys that differ from the schema defaults, the resolved ``config.yaml``) and **Run** (the finished
stages from ``manifest.json`` and every file that could not be read).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import Any

from ..runtime.rundir import CONFIG, MANIFEST
from .collect import RunData
from .document import Bullets, Code, Section, Table, Text, fmt_seconds, is_num

def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def _schema_defaults(raw: dict) -> dict[str, Any] | None:
    """Flattened schema defaults for the keys of ``raw`` (students compared to a default stage)."""
    try:
        from ..config.schema import Config, StageConfig

        defaults = Config().to_dict()
        n = len(raw.get("students") or []) if isinstance(raw.get("students"), list) else 0
        defaults["students"] = [dataclasses.asdict(StageConfig()) for _ in range(n)]
        return _flatten(defaults)
    except Exception:  # noqa: BLE001 - the schema may have moved on; the table is optional
        return None


def _short(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def config_section(run: RunData) -> Section:
    """The experiment's settings in words, the keys off their defaults, and the whole config."""
    blocks: list = []
    if run.config is None:
        blocks.append(Text(f"No readable `{CONFIG}`.", "note"))
        return Section("config", "Configuration", blocks)
    def c(key: str, default: Any = None) -> Any:  # for display: 3.0 -> 3, 0.05 stays
        v = run.cfg(key, default)
        return _short(v) if isinstance(v, float) else v

    students = c("students") if isinstance(c("students"), list) else []
    chain = " → ".join([str(c("teacher.model", "?"))] + [str((s or {}).get("model", "?")) for s in students
                                                         if isinstance(s, dict)])
    t_ep = c("teacher.epochs") if c("teacher.epochs") is not None else c("train.epochs")
    s_ep = sorted({_short(s.get("epochs") if s.get("epochs") is not None else c("train.epochs"))
                   for s in students if isinstance(s, dict)})
    noise = (f"RandAugment {c('noise.randaugment_ops')} ops, magnitude {c('noise.randaugment_magnitude')}"
             if c("noise.augment") else "no input augmentation")
    rows = [
        ("data", f"{c('data.source', '?')}" + (f" ({c('data.name')})" if c("data.name") else "")
         + (f", {c('data.labels_per_class')} labels per class" if c("data.labels_per_class") else "")
         + (f", at most {c('data.max_unlabeled')} unlabeled" if c("data.max_unlabeled") else "")
         + (f", {c('data.image_size')} px" if c("data.image_size") else "")),
        ("chain", chain),
        ("epochs", f"teacher {_short(t_ep)}, students {', '.join(s_ep) or '–'}"),
        ("optimisation", f"{c('train.optimizer', '?')}, lr {c('train.lr', '?')}, batch {c('train.batch_size', '?')} "
                         f"labeled + {c('train.unlabeled_ratio', '?')}× pseudo-labeled, {c('train.scheduler', '?')} "
                         f"schedule, label smoothing {c('train.label_smoothing', '?')}"),
        ("noise", f"{noise}; dropout {c('noise.dropout', '?')}, stochastic depth {c('noise.drop_path', '?')}"),
        ("pseudo labels", ("hard" if c("pseudo.hard") else f"soft (T = {c('pseudo.temperature', 1)})")
         + f", threshold {c('pseudo.threshold', '?')}, "
         + ((f"balanced to K = {c('pseudo.per_class')}" if c("pseudo.per_class") else "balanced (K from the data)")
            if c("pseudo.balance", True) else "not balanced")),
        ("seed, device", f"{c('seed', '?')}, {c('device', '?')}"),
    ]
    blocks.append(Table(["setting", "value"], [list(r) for r in rows], [False, False],
                        f"The settings that shape the experiment, from the resolved `{CONFIG}`."))
    defaults = _schema_defaults(run.config)
    if defaults is not None:
        flat = _flatten(run.config)
        diff = [[f"{k}", _short(v), _short(defaults[k]) if k in defaults else "(not in schema)"]
                for k, v in flat.items() if k not in defaults or defaults[k] != v]
        if diff:
            blocks.append(Table(["key", "value", "default"], diff, [False, False, False],
                                "Keys that differ from the schema defaults (`docs/configuration.md`); "
                                "students are compared with a default stage."))
        else:
            blocks.append(Text("Every key has its schema default.", "note"))
    if run.config_text:
        blocks.append(Code(run.config_text.rstrip("\n"), "yaml", f"The resolved config ({CONFIG})"))
    return Section("config", "Configuration", blocks)


_PHASE_WORDS = {"startup": "start-up (process start to the run: imports, config, run folder)",
                "data_scan": "data scan (splits, pool listing)", "report": "report",
                "other": "other (summary, logging)"}


def _phase_rows(phases: dict) -> list[list[str]]:
    """The phases table: start-up, data scan, each stage (a training stage's training and
    validation totals and its final measurement below it), the rest, the total. The report's own
    time is left out (shares of the total without it), so the report the run writes and a rebuild
    show the same table."""
    total = phases["total"] - (phases.get("report") if is_num(phases.get("report")) else 0)

    def row(name: str, seconds: Any) -> list[str]:
        share = f"{100 * seconds / total:.0f}%" if is_num(seconds) and total > 0 else "–"
        return [name, fmt_seconds(seconds), share]

    rows = [row(_PHASE_WORDS.get(k, k), v) for k, v in phases.items()
            if k not in ("total", "stages", "other", "report") and is_num(v)]
    for s in phases.get("stages") or []:
        if not isinstance(s, dict):
            continue
        rows.append(row(f"{s.get('stage')} ({s.get('phase')})", s.get("seconds")))
        epochs = [e for e in s.get("epochs") or [] if isinstance(e, dict)]
        if epochs and is_num(s.get("train")) and is_num(s.get("val")):  # totals; one row per epoch would be long
            rows.append(row(f"  training, {len(epochs)} epoch{'s' if len(epochs) != 1 else ''} "
                            f"({fmt_seconds(s['train'] / len(epochs))} each)", s["train"]))
            rows.append(row(f"  validation, {len(epochs)} pass{'es' if len(epochs) != 1 else ''}", s["val"]))
        if is_num(s.get("final_measurement")):
            rows.append(row("  final measurement (val and test splits)", s["final_measurement"]))
    if is_num(phases.get("other")):
        rows.append(row(_PHASE_WORDS["other"], phases["other"]))
    return rows + [row("total", total)]


def run_section(run: RunData) -> Section:
    """Finished stages (what ``--resume`` skips) and the files the report could not read."""
    blocks: list = []
    stages = (run.manifest or {}).get("stages") or {}
    if isinstance(stages, dict) and stages:
        rows = []
        for name, info in stages.items():
            info = info if isinstance(info, dict) else {}
            when = info.get("finished")
            when = (_dt.datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S")
                    if is_num(when) else "–")
            files = info.get("files")
            rows.append([name, when, fmt_seconds(info.get("seconds")),
                         ", ".join(map(str, files)) if isinstance(files, list) else "–"])
        blocks.append(Table(["stage", "finished", "took", "files"], rows, [False, False, True, False],
                            f"Finished stages, from `{MANIFEST}` (`--resume` skips these)."))
    else:
        blocks.append(Text(f"No finished stage in `{MANIFEST}`.", "note"))
    phases = (run.summary or {}).get("phases")
    if isinstance(phases, dict) and is_num(phases.get("total")):
        blocks.append(Table(["phase", "seconds", "share"], _phase_rows(phases), [False, True, True],
                            "Where this run's time went (summary.json `phases`; the report's own time "
                            "is in summary.json only). A stage finished by an earlier run only loads."))
    if run.problems:
        blocks.append(Text("Files that could not be read:", "warn"))
        blocks.append(Bullets(list(run.problems), "warn"))
    return Section("run", "Run", blocks)
