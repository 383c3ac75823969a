"""The report's robustness section, from ``evaluate/robustness.json`` (what
:func:`noisystudent.evaluate.classifier.evaluate_checkpoints` writes: one result of
:func:`noisystudent.robustness.evaluate_robustness` per model). Suites it does not know are shown
as flat numbers, so a new suite appears in the report before the report learns about it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import plots
from .collect import RunData
from .document import Figures, Heading, Plot, Row, Section, Table, Text, fmt, fmt_int, fmt_value, is_num

_KNOWN_SUITES = {"clean", "corruptions", "perturbations", "fgsm", "pgd", "natural_adversarial"}
_META_KEYS = {"n_images", "seed"}


def robustness_section(run: RunData) -> Section:
    """Summary table, then corruptions, perturbations and attacks (a table and a plot each), then any
    other numbers of ``evaluate/robustness.json``, teacher and final student side by side."""
    rob = run.robustness or {}
    models = {k: v for k, v in rob.items() if isinstance(v, dict) and (_KNOWN_SUITES & set(v) or
                                                                     any(isinstance(x, dict) for x in v.values()))}
    if not models:
        return Section("robustness", "Robustness", [Text("`evaluate/robustness.json` holds no model results.", "note")])
    model_label = {s["name"]: f"{s['name']} ({s.get('model', '?')})" for s in run.stages + [run.fixres or {}]
                   if "name" in s}
    n_img = {m.get("n_images") for m in models.values() if is_num(m.get("n_images"))}
    blocks: list = [Text("Evaluated on "
                         + (f"{fmt_int(next(iter(n_img)))} test images" if len(n_img) == 1 else "the test split")
                         + ": " + ", ".join(f"`{model_label.get(k, k)}`" for k in models)
                         + ". Accuracies and errors in %; lower error and flip probability are better.", "note")]
    blocks += _summary_blocks(models, model_label)
    blocks += _corruption_blocks(models)
    blocks += _perturbation_blocks(models)
    blocks += _attack_blocks(models)
    blocks += _other_blocks(models, rob)
    return Section("robustness", "Robustness", blocks)


def _get(res: dict, *path: str) -> Any:
    """``res[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    node: Any = res
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def _last(res: dict, suite: str) -> Any:
    """An attack suite's top-1 at its largest eps."""
    v = _get(res, suite, "top1")
    return v[-1] if isinstance(v, list) and v else None


def _summary_blocks(models: dict[str, dict], model_label: dict[str, str]) -> list:
    """One row per model, one column per headline number any model has."""
    def eps_max(suite: str) -> str:
        eps = [_get(r, suite, "eps") for r in models.values()]
        eps = [e[-1] for e in eps if isinstance(e, list) and e and is_num(e[-1])]
        return f" (eps {eps[0]:g})" if eps and len(set(eps)) == 1 else " (largest eps)"

    candidates = [
        ("clean top-1", lambda r: _get(r, "clean", "top1")), ("clean top-5", lambda r: _get(r, "clean", "top5")),
        ("corruption error", lambda r: _get(r, "corruptions", "mean_error")),
        ("mCE", lambda r: _get(r, "corruptions", "mce")),
        ("relative mCE", lambda r: _get(r, "corruptions", "relative_mce")),
        ("flip prob.", lambda r: _get(r, "perturbations", "mean_flip_prob")),
        ("mFR", lambda r: _get(r, "perturbations", "mfr")), ("mT5D", lambda r: _get(r, "perturbations", "mt5d")),
        ("FGSM top-1" + eps_max("fgsm"), lambda r: _last(r, "fgsm")),
        ("PGD top-1" + eps_max("pgd"), lambda r: _last(r, "pgd")),
        ("natural adv. top-1", lambda r: _get(r, "natural_adversarial", "top1")),
    ]
    cols = [(label, fn) for label, fn in candidates if any(is_num(fn(r)) for r in models.values())]
    if not cols:
        return []
    return [Table(["model"] + [c for c, _ in cols],
                  [[model_label.get(m, m)] + [fmt(fn(r)) for _, fn in cols] for m, r in models.items()],
                  [False] + [True] * len(cols),
                  "Robustness summary. Corruption error: mean over the ImageNet-C corruptions and severities; "
                  "mCE / relative mCE and mFR are normalised by AlexNet (ImageNet models only); flip prob.: "
                  "mean flip probability over the perturbation sequences; mT5D: mean top-5 distance.")]


def _corruption_blocks(models: dict[str, dict]) -> list:
    """A table per corruption (error, and CE where normalised), the plot below it (full width)."""
    errs = {m: _get(r, "corruptions", "error") for m, r in models.items()}
    errs = {m: e for m, e in errs.items() if isinstance(e, dict) and e}
    if not errs:
        return []
    names = list(dict.fromkeys(n for e in errs.values() for n in e))
    ces = {m: _get(models[m], "corruptions", "ce") for m in errs}
    has_ce = any(isinstance(c, dict) and c for c in ces.values())
    rows = []
    for n in names:
        row = [n.replace("_", " ")]
        for e in errs.values():
            v = e.get(n)
            ok = isinstance(v, list) and v and all(is_num(x) for x in v)
            row.append(fmt(float(np.mean(v))) if ok else "–")
        if has_ce:
            row += [fmt((ces[m] or {}).get(n)) if isinstance(ces[m], dict) else "–" for m in errs]
        rows.append(row)
    groups = [("", 1), ("error (%)", len(errs))] + ([("CE (%)", len(errs))] if has_ce else [])
    table = Table(["corruption"] + list(errs) * (2 if has_ce else 1), rows,
                  [False] + [True] * (len(errs) * (2 if has_ce else 1)),
                  "Error per corruption, averaged over severities"
                  + ("; CE: the error relative to AlexNet's (100 = AlexNet)." if has_ce else "."), groups=groups)
    png = plots.corruption_plot(errs)
    fig = [Figures([Plot("robustness-corruptions", png, "Corruptions: error against severity, averaged over "
                         "corruptions (left), and error per corruption, averaged over severities (right).",
                         "corruption error plot")])] if png else []
    return [Heading("Corruptions", "robustness-corruptions"), table, *fig]


def _perturbation_blocks(models: dict[str, dict]) -> list:
    """Flip rate (or probability) and top-5 distance per perturbation: table and plot side by side."""
    key = "fr" if all(isinstance(_get(r, "perturbations", "fr"), dict) for r in models.values()
                      if _get(r, "perturbations")) else "flip_prob"
    pert = {m: _get(r, "perturbations", key) for m, r in models.items()}
    pert = {m: p for m, p in pert.items() if isinstance(p, dict) and p}
    if not pert:
        return []
    names = list(dict.fromkeys(n for p in pert.values() for n in p))
    t5 = {m: _get(models[m], "perturbations", "t5d") for m in pert}
    has_t5 = any(isinstance(t, dict) and t for t in t5.values())
    label = "flip rate (% of AlexNet)" if key == "fr" else "flip probability (%)"
    words = "flip rate, in % of AlexNet's" if key == "fr" else "flip probability, in %"
    rows = [[n.replace("_", " ")] + [fmt(p.get(n)) for p in pert.values()]
            + ([fmt((t5[m] or {}).get(n)) if isinstance(t5[m], dict) else "–" for m in pert] if has_t5 else [])
            for n in names]
    groups = [("", 1), ("FR" if key == "fr" else "flip prob.", len(pert))]
    groups += [("T5D", len(pert))] if has_t5 else []
    row: list = [Table(["perturbation"] + list(pert) * (2 if has_t5 else 1), rows,
                       [False] + [True] * (len(pert) * (2 if has_t5 else 1)),
                       f"Perturbation stability: how often the top-1 prediction flips between consecutive frames "
                       f"({words})" + (" and the top-5 distance (T5D, in ranks)." if has_t5 else "."),
                       groups=groups)]
    png = plots.perturbation_plot(pert, label)
    if png:
        row.append(Figures([Plot("robustness-perturbations", png, f"Perturbations: {words} per perturbation "
                                 "and model; lower is more stable.", "perturbation flip plot")]))
    return [Heading("Perturbations", "robustness-perturbations"), Row(row)]


def _attack_blocks(models: dict[str, dict]) -> list:
    """FGSM and PGD accuracy per eps: table and plot side by side."""
    curves: dict[str, dict] = {}
    for m, r in models.items():
        for suite in ("fgsm", "pgd"):
            eps, top1 = _get(r, suite, "eps"), _get(r, suite, "top1")
            if isinstance(eps, list) and isinstance(top1, list) and len(eps) == len(top1) and eps \
                    and all(is_num(e) for e in eps):
                steps = _get(r, suite, "steps")
                kind = suite.upper() + (f"-{steps}" if suite == "pgd" and steps else "")
                curves.setdefault(m, {})[kind] = (eps, top1)
    if not curves:
        return []
    series = [(m, kind, dict(zip(map(float, e), t))) for m, d in curves.items() for kind, (e, t) in d.items()]
    all_eps = sorted({e for _, _, d in series for e in d})
    row: list = [Table(["eps"] + [kind for _, kind, _ in series],
                       [[f"{e:g}"] + [fmt(d.get(e)) for _, _, d in series] for e in all_eps],
                       [True] * (1 + len(series)),
                       "Top-1 accuracy (%) under white-box FGSM and PGD attacks of size eps (0-255 pixel units).",
                       groups=[("", 1)] + [(m, len(d)) for m, d in curves.items()])]
    png = plots.attack_plot(curves)
    if png:
        row.append(Figures([Plot("robustness-attacks", png, "Adversarial attacks: top-1 accuracy against eps; "
                                 "FGSM solid, PGD dashed.", "adversarial accuracy plot")]))
    return [Heading("Adversarial attacks", "robustness-attacks"), Row(row)]


def _other_blocks(models: dict[str, dict], rob: dict) -> list:
    """Numbers of suites the report does not know, as flat values (a new suite shows before the
    report learns about it)."""
    extra: dict[str, dict[str, Any]] = {}
    for m, r in models.items():
        for suite, val in r.items():
            if suite in _KNOWN_SUITES or suite in _META_KEYS:
                continue
            for k, v in (val.items() if isinstance(val, dict) else [("", val)]):
                if is_num(v):
                    extra.setdefault(f"{suite}.{k}" if k else suite, {})[m] = v
    other_top = {k: v for k, v in rob.items() if k not in models and is_num(v)}
    if not (extra or other_top):
        return []
    row = []
    if extra:
        ms = list(models)
        row.append(Table(["result"] + ms, [[k] + [fmt_value(v.get(m)) for m in ms] for k, v in extra.items()],
                         [False] + [True] * len(ms), "Other results in `evaluate/robustness.json`."))
    if other_top:
        row.append(Table(["key", "value"], [[k, fmt_value(v)] for k, v in other_top.items()], [False, True],
                         "Other values in `evaluate/robustness.json`."))
    return [Heading("Other results", "robustness-other"), Row(row)]
