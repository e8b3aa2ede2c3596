"""One report per study: the figures as PNG files plus `report.md` (relative image links) and `report.html` (the
same content with the images embedded, one file to mail or attach), written into `<study dir>/report/`."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.emit import numerics_note
from harness.errors import UserError
from harness.measure.vllm_bench import work_text
from harness.report.figures import all_figures
from harness.report.results import StudyResults, check_latency, latency_label, register_view
from harness.study.trials import (CLIENT_LIMITED_LABEL, Attr, best_feasible, capacity_limit, category_of, is_measured,
                                  label_of, metric_of, outcome_of, per_gpu_metric, reason_of, settings_of)

FAILURE_HINTS = {
    "oom": "out of device memory at start-up or under load: lower gpu_memory_utilization, max_num_seqs or "
           "max_num_batched_tokens, or spread the model over more GPUs (tensor_parallel_size)",
    "kv_too_small": "the KV cache cannot hold one max_model_len sequence: lower max_model_len, raise "
                    "gpu_memory_utilization or use kv_cache_dtype fp8 (vLLM's estimate of the longest length that "
                    "fits is the trial's max_fitting_len attribute)",
    "bad_arg": "the installed vLLM rejected a setting or value: check the space against `vllm serve --help` of "
               "this vLLM version",
    "start_timeout": "the server was not ready in time: raise start_timeout_s in the sweep file (big models and "
                     "graph capture take minutes) and read the server log",
    "crash": "the server process died: read its log",
    "infeasible": "the planner found it cannot run on this hardware",
    "client_invalid": "the load generator, not the server, was the bottleneck: the number is not a server number",
    "pruned": "the planner or a condition of the space ruled it out before launch; no device time was spent",
    "interrupted": "the worker stopped (Ctrl-C, lost machine) or the harness raised; a rerun of the sweep retries it",
    "slo_violated": "it ran, but missed the SLO even at the lowest load tried (capacity) or at the objective's load",
    "client_limited": "client-limited (invalid): the load client fell behind its schedule, so the run measured the "
                      "client, not the server; its number is left out",
}
SECTIONS = {
    "history": ("What the tuner tried",
                "Each point is one trial's objective value, in the order the tuner ran them; the line is the best "
                "feasible value so far, the dashed line the baseline (vLLM defaults; with its spread over the "
                "confirmation repeats when they measured the same metric). Failed launches sit on zero, pruned "
                "trials are marked on the axis: neither carries a measurement."),
    "pareto": ("Throughput vs latency",
               "Every measured trial placed by latency (x) and throughput (y): up and left is better. Red points are "
               "the Pareto front of the feasible trials; orange ones missed the SLO. Trials with no measurement are "
               "listed beside the plot with their reasons."),
    "importances": ("Which settings mattered",
                    "How much each knob decided the objective, over the measured sampled trials (Optuna's "
                    "importance evaluator). With few trials this is a hint, not a ranking to trust."),
    "slices": ("How the objective moves with the top knobs",
               "The objective against each of the most important knobs' values (Optuna's slice plot); the dashed "
               "line is the baseline, the star the recommended configuration."),
    "latency_vs_load": ("Latency vs load",
                        "TTFT and TPOT percentiles of the baseline and the recommended configuration as the offered "
                        "load grows; the SLO limit, each configuration's capacity and the confirmation repeats "
                        "(diamonds, at the load they served) are marked."),
    "memory": ("Memory",
               "Peak memory per trial against the device's memory, and the KV-cache size vLLM reported next to the "
               "planner's estimate (bars: measured, dashes: planned)."),
}


# ------------------------------------------------------------------------------------------------- document


@dataclass
class Doc:
    """A few block kinds, rendered both to Markdown and to a self-contained HTML page."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        if rows:
            self.blocks.append(("table", (header, rows)))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, data in self.blocks:
            if kind == "h":
                out += [f"{'#' * data[0]} {data[1]}", ""]
            elif kind == "p":
                out += [data, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in data] + [""]
            elif kind == "table":
                header, rows = data
                out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                out.append("| " + " | ".join("---" for _ in header) + " |")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{data[1]}]({data[0].name})", ""]
            elif kind == "code":
                out += ["```", data, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        parts = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, data in self.blocks:
            if kind == "h":
                parts.append(f"<h{data[0]}>{_inline(data[1])}</h{data[0]}>")
            elif kind == "p":
                parts.append(f"<p>{_inline(data)}</p>")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in data) + "</ul>")
            elif kind == "table":
                header, rows = data
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{_inline(_cell(c))}</td>" for c in row) + "</tr>"
                               for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                png = base64.b64encode(Path(data[0]).read_bytes()).decode()
                parts.append(f'<figure><img alt="{html.escape(data[1])}" src="data:image/png;base64,{png}">'
                             f"</figure>")
            elif kind == "code":
                parts.append(f"<pre><code>{html.escape(data)}</code></pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
                 "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
                 "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:1px 4px}"
                 "pre{background:#f3f3f3;padding:8px;overflow-x:auto}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _md_cell(value: Any) -> str:
    return _cell(value).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """Markdown `code` and **bold** to HTML, the rest escaped."""
    out, code, bold = [], False, False
    escaped = html.escape(str(text))
    i = 0
    while i < len(escaped):
        if escaped[i] == "`":
            out.append("</code>" if code else "<code>")
            code = not code
            i += 1
        elif escaped.startswith("**", i) and not code:
            out.append("</b>" if bold else "<b>")
            bold = not bold
            i += 2
        else:
            out.append(escaped[i])
            i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------------- content


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return f"{text} {unit}".strip()


def _spread(mean: float | None, std: float | None, n: int | None, lo: float | None, hi: float | None,
            unit: str, invalid: list[float] | None = None) -> str:
    """Mean ± sd over the valid runs; runs the client limited are named apart, never averaged in."""
    left_out = ""
    if invalid:
        left_out = (f"; {len(invalid)} {CLIENT_LIMITED_LABEL} run{'s' if len(invalid) > 1 else ''} left out "
                    f"({', '.join(_fmt(v) for v in invalid)})")
    if mean is None or not n:
        return (f"no valid run: {len(invalid)} {CLIENT_LIMITED_LABEL} (" + ", ".join(_fmt(v, unit) for v in invalid)
                + "), not a server number") if invalid else "-"
    if n > 1:
        valid = " valid" if invalid else ""
        return (f"{_fmt(mean)} ± {std or 0.0:.2g} {unit} (mean ± sd of {n}{valid} runs; range {_fmt(lo)}-{_fmt(hi)}"
                f"{left_out})")
    return _fmt(mean, unit) + (" (one measurement" + left_out + ")")


def _improvement_text(imp: dict[str, Any]) -> str:
    rel = imp.get("relative")
    if rel is None:
        return "-"
    text = f"{rel:+.1%}"
    if imp.get("gain_basis"):  # a baseline repeat counted at its capacity's goodput: its min and max are no pairing
        return f"{text} ({imp['gain_basis']})"
    w_lo, w_hi, b_lo, b_hi = (imp.get(k) for k in ("winner_min", "winner_max", "baseline_min", "baseline_max"))
    if (imp.get("winner_n") or 0) > 1 and b_lo and b_hi:
        text += f" (worst to best pairing of the repeats: {w_lo / b_hi - 1:+.1%} to {w_hi / b_lo - 1:+.1%})"
    return text


def _identity_rows(r: StudyResults) -> list[list[Any]]:
    wl = r.workload
    lengths = []
    for key, word in (("input_len", "input"), ("output_len", "output")):
        d = wl.get(key) or {}
        if d.get("dist") == "uniform":
            lengths.append(f"{word} {d.get('min')}-{d.get('max')} tokens")
        elif d.get("dist") == "fixed":
            lengths.append(f"{word} {d.get('value')} tokens")
        elif d:
            lengths.append(f"{word} {d.get('dist')}")
    space = r.space
    knobs = list((space.get("knobs") or {}).keys())
    objective = r.objective_spec.describe(r.load_label, r.slo_text())
    return [["model", f"`{r.model}`"], ["hardware", r.hardware_label],
            ["workload", f"{wl.get('name', '?')} ({wl.get('api', '?')} API" + (", " + ", ".join(lengths) if lengths
                                                                              else "") + ")"],
            ["objective", objective],
            ["search space", f"{space.get('name', '?')}: {len(knobs)} knobs ({', '.join(knobs)})" if space else "-"],
            *_fixed_rows(space.get("fixed") or {}),
            ["storage", f"`{r.storage}`"]]


def _fixed_rows(fixed: dict[str, Any]) -> list[list[str]]:
    """What every trial of the study ran with, baselines included ("vLLM defaults" are vLLM's defaults plus
    these), and what that means for the model's numerics (FP8 weights: another model's outputs)."""
    if not fixed:
        return []
    rows = [["fixed in every trial", ", ".join(f"`{k}={v}`" for k, v in sorted(fixed.items()))
             + " (the baselines too: vLLM defaults here are its defaults with these)"]]
    note = numerics_note(fixed)
    return rows + ([["numerics", note]] if note else [])


def _counts_text(r: StudyResults) -> str:
    c = r.counts()
    parts = [f"{c['trials']} trials", f"{c['ok']} measured and feasible", f"{c['slo_violated']} missed the SLO"]
    if c.get("client_limited"):
        parts.append(f"{c['client_limited']} {CLIENT_LIMITED_LABEL}")
    kinds = sorted(k.split(":", 1)[1] for k in c if k.startswith("failed:"))
    detail = ", ".join(f"{k} x{c['failed:' + k]}" for k in kinds)
    parts.append(f"{c['failed']} failed to run" + (f" ({detail})" if kinds else ""))
    parts.append(f"{c['pruned']} pruned before launch")
    if c["interrupted"]:
        parts.append(f"{c['interrupted']} interrupted")
    if c["running"]:
        parts.append(f"{c['running']} still running")
    return ", ".join(parts)


def _device_time_text(r: StudyResults) -> str:
    hours = r.device_seconds / 3600.0
    if r.on_cpu:
        return f"{hours:.2f} server-hours on the CPU host (sweep trials; confirmation runs not included)"
    return f"{hours:.2f} GPU-hours (time servers held their GPUs x GPUs held; confirmation runs not included)"


def _ceiling_text(r: StudyResults) -> str | None:
    """The ceiling per GPU with where it was served, and the recommended capacity as a share of it."""
    c = r.ceiling
    if c is None:
        return None
    rec = r.recommended_trial
    share = c.share(per_gpu_metric(rec, r.objective_spec.metric)) if rec is not None else None  # as emit's
    lat = ", ".join(f"p99 {name} {v:.0f} ms" for name, v in (("TTFT", c.p99_ttft_ms), ("TPOT", c.p99_tpot_ms))
                    if v is not None)
    per = f"per {r.device_unit}"
    return (f"{c.req_s_per_gpu:.3g} req/s {per} (trial #{c.trial} on {r.gpu_words(c.gpus)}, at "
            f"{c.offered_per_gpu:.3g} req/s {per} offered: {'held' if c.held else 'did not hold'}"
            + (f"; {lat}" if lat else "") + ")"
            + (f"; the recommended configuration's capacity at the SLO is {share:.0%} of it" if share else ""))


def _kv_ratio_text(r: StudyResults) -> str | None:
    ratios = []
    for t in r.trials:
        measured, planned = metric_of(t, "kv_cache_tokens"), (t.user_attrs.get(Attr.PLAN) or {}).get("kv_cache_tokens")
        planned = planned or metric_of(t, "planned_kv_cache_tokens")
        if measured and planned:
            ratios.append(measured / float(planned))
    if not ratios:
        return None
    return (f"KV-cache size measured by vLLM / planned by the harness: median {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} launched trials.")


def _short_settings(t: Any, knobs: list[str]) -> str:
    settings = settings_of(t)
    shown = {k: settings[k] for k in knobs if k in settings}
    if not shown:
        return "vLLM defaults for every knob"
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def build_document(r: StudyResults, images: dict[str, tuple[Path | None, str | None]], latency: str) -> Doc:
    """`images`: figure name -> (PNG path, None) or (None, why there is no figure)."""
    model, hw, wl, obj = (r.parts[k] for k in ("model", "hardware", "workload", "objective"))
    doc = Doc(f"Sweep review: {model} on {hw}, workload {wl}, objective {obj}")
    doc.p(f"Study `{r.name}`, generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
          f"`python -m harness.report`.")
    doc.table(["", ""], _identity_rows(r))

    # ---- summary
    doc.h("Summary")
    imp = r.improvement()
    rec, base = r.recommended_trial, r.baseline_trial
    unit = (imp or {}).get("unit") or r.objective_unit
    c = r.counts()
    if c["trials"] and not c["measured"]:
        doc.p("**No trial produced a measurement, so nothing is recommended.** Every trial failed to start, was "
              "pruned before launch or was interrupted; the reasons are below, grouped by kind, with what to "
              "change.")
    elif imp is not None:
        doc.p(f"**{imp['verdict']}.**" if not str(imp["verdict"]).endswith(".") else f"**{imp['verdict']}**")
    rows: list[list[Any]] = []
    if imp is not None:
        b_n, w_n = imp.get("baseline_n") or 0, imp.get("winner_n") or 0
        rows.append([f"baseline{' ' + label_of(base) if base is not None else ''}: {imp['label']}",
                     _spread(imp.get("baseline_mean"), imp.get("baseline_std"), b_n, imp.get("baseline_min"),
                             imp.get("baseline_max"), unit, imp.get("baseline_invalid"))])
        best = best_feasible(r.trials)
        side = ("best trial" if best is None or best.number == imp.get("winner_trial") else
                "best trial other than the baseline")  # the defaults measured best: the challenger (tune.challenger)
        rows.append([f"{side} #{imp.get('winner_trial')}: {imp['label']}",
                     _spread(imp.get("winner_mean"), imp.get("winner_std"), w_n, imp.get("winner_min"),
                             imp.get("winner_max"), unit, imp.get("winner_invalid"))])
        rows.append(["GPUs on each side", imp.get("sides") or "-"])
        gain = imp.get("gain_per_gpu")
        if imp.get("per_gpu") or imp.get("equal_gpus"):
            rows.append(["improvement over the baseline, per GPU",
                         _improvement_text(imp) + f" - {imp['source']}"])
        else:
            rows.append(["improvement over the baseline (unequal GPUs)",
                         _improvement_text(imp) + f" - {imp['source']}; it compares "
                         f"{r.gpu_words(imp.get('winner_gpus'))} with {r.gpu_words(imp.get('baseline_gpus'))}"])
            rows.append(["improvement per GPU", "-" if gain is None else f"{gain:+.1%}"])
        if r.confirm_rate:
            per = imp.get("per_gpu")
            rows.append(["how it was confirmed",
                         "both configurations served a Poisson load at the best trial's capacity"
                         + (" per GPU times each side's GPUs" if per else f" ({r.confirm_rate:g} req/s)")
                         + (f" ({imp['mode']})" if imp.get("mode") else "")
                         + "; scored by goodput" + (" per GPU" if per else "")])
        scaling = imp.get("scaling")
        if scaling:
            eff = scaling.get("efficiency")
            rows.append(["scaling with replicas",
                         f"{scaling.get('replicas')} replicas on {scaling.get('gpus')} GPUs: "
                         + ("not measured (" + str(scaling.get("failure")) + ")" if eff is None else
                            f"{scaling.get('value_per_gpu'):.4g} per GPU vs {scaling.get('one_server_per_gpu'):.4g} "
                            f"for one server: scaling efficiency {eff:.0%}")])
        rows += _cross_check_rows(imp.get("cross_check"))
    mine = r.confirm_committed
    if mine:
        rows.append([f"against the committed config (trial #{mine.get('baseline_trial')})",
                     f"{mine.get('verdict')}" + (f" - GPUs: {mine['pairing']}" if mine.get("pairing") else "")])
    rows.append(["recommended configuration",
                 ((label_of(rec) + (" (the baseline is kept)" if base is not None and rec.number == base.number
                                    else "")) if rec is not None else "none: no feasible trial")
                 + ("" if r.confirmed or rec is None else " - best so far, not confirmed")])
    ceiling = _ceiling_text(r)
    if ceiling:
        rows.append(["ceiling: the highest throughput any load step served (SLO or not)", ceiling])
    limit = capacity_limit(rec, r.device_unit) if rec is not None else None
    if limit:
        rows.append([f"what bounded {label_of(rec)}'s capacity", f"{limit} (SLO: {r.slo_text()})"])
    rows.append(["trials", _counts_text(r)])
    rows.append(["device time", _device_time_text(r)])
    doc.table(["summary", ""], rows)
    if rec is not None:
        doc.p(f"The sweep writes the recommended settings to `{r.config_path}` (with this study, "
              f"the trial number and the measured numbers as provenance); review this report, then commit that "
              f"file.")
        st = r.settings_table()
        doc.table(["setting", "baseline", "recommended", "changed"],
                  [[f"`{row.setting}`", row.baseline, row.recommended, "**changed**" if row.changed else ""]
                   for row in st.itertuples()])

    failures = _failures_section
    if not c["measured"]:
        failures(doc, r)  # nothing was measured: the reasons are the report

    # ---- figures
    for name in ("history", "pareto", "importances", "slices", "latency_vs_load", "memory"):
        if name not in images:
            continue
        heading, text = SECTIONS[name]
        doc.h(heading)
        path, note = images[name]
        if note is not None:
            doc.p(f"**No figure:** {note.splitlines()[0]}")
            continue
        if name == "pareto":
            text += f" Latency axis: {latency_label(latency)} (`--latency` picks another)."
        doc.p(text)
        doc.image(path, heading)
        if name == "memory":
            ratio = _kv_ratio_text(r)
            if ratio:
                doc.p(ratio)
    if c["measured"]:
        failures(doc, r)

    _time_section(doc, r)

    # ---- all trials
    doc.h("All trials")
    lat_cols = [m for m in ("p99_ttft_ms", "p99_tpot_ms") if m != latency] + [latency]
    header = ["trial", "outcome", r.objective_label] + [latency_label(m) for m in lat_cols] + ["settings"]
    rows = []
    for t in r.trials:
        value = r.objective_value(t)
        rows.append([label_of(t), outcome_of(t), _fmt(value) if value is not None else "-"]
                    + [_fmt(metric_of(t, m)) if is_measured(t) else "-" for m in lat_cols]
                    + [_short_settings(t, r.knobs)])
    doc.table(header, rows)
    doc.p("The same table with every metric is `trials.csv` in the study folder, or `StudyResults.table` in "
          "Python (`harness.report.load_study`).")

    # ---- live view
    doc.h("Live view")
    doc.p("While a sweep runs (or afterwards), Optuna's dashboard reads the same storage; every trial's metrics, "
          "outcome and failure reason are its user attributes:")
    doc.code(f"optuna-dashboard {r.storage}")
    return doc


def _time_section(doc: Doc, r: StudyResults) -> None:
    spent = r.time_spent()
    unit = r.device_unit
    doc.h("Where the time went")
    if spent.device_s <= 0:
        doc.p(f"No trial held a device yet ({spent.finished} finished, {spent.pruned} pruned before launch).")
        return
    rate, launched = spent.trials_per_device_hour, spent.launched_per_device_hour
    text = (f"{spent.finished} finished trials ({spent.launched} launched, {spent.pruned} pruned before launch at "
            f"0 s) held {spent.device_s / 3600.0:.2f} {unit}-hours on {r.hardware_label}: **{rate:.1f} trials per "
            f"{unit}-hour** ({launched:.1f} launched trials per {unit}-hour). Device time is wall time x the "
            f"devices a trial held; confirmation runs are not included.")
    if spent.compile_cache:
        text += " vLLM's compile cache per launched trial: " + ", ".join(
            f"{state} x{n}" for state, n in sorted(spent.compile_cache.items())) + "."
    doc.p(text)
    doc.table(["where the time went", f"{unit}-minutes on {r.hardware_label}", "share"],
              [[where, f"{secs / 60.0:.1f}", f"{share:.0%}" if share is not None else "-"]
               for where, secs, share in spent.rows()])


def _failures_section(doc: Doc, r: StudyResults) -> None:
    bad = [t for t in r.trials if category_of(t) not in ("ok", "running", "waiting")]
    doc.h("Failed, pruned and SLO-violating trials")
    if not bad:
        doc.p("None: every trial ran and met the SLO.")
        return
    kinds: dict[str, list[Any]] = {}
    for t in bad:
        kinds.setdefault(outcome_of(t).split(":", 1)[-1], []).append(t)
    doc.bullets([f"**{kind}** ({len(ts)}: {', '.join(f'#{t.number}' for t in ts)}): "
                 f"{FAILURE_HINTS.get(kind, 'see the reason column')}" for kind, ts in kinds.items()])
    logs = r.dir is not None
    doc.table(["trial", "outcome", "reason", "settings"] + (["server log"] if logs else []),
              [[label_of(t), outcome_of(t), reason_of(t) or "-", _short_settings(t, r.knobs)]
               + ([f"`logs/trial{t.number:03d}/`" if category_of(t) == "failed" else ""] if logs else [])
               for t in bad])


# ------------------------------------------------------------------------------------------------- writing


def write_report(r: StudyResults, out_dir: str | Path | None = None, *, latency: str | None = None,
                 throughput: str | None = None) -> Path:
    """Write `<out_dir>/{history,pareto,...}.png`, `report.md` and `report.html`; return the report.md path."""
    if out_dir is None:
        if r.dir is None:
            raise UserError("this study was read from a storage URL: say where the report goes (--out DIR)",
                            key="--out")
        out_dir = r.dir / "report"
    if not r.trials:
        raise UserError(f"study {r.name} has no trials yet; nothing to report (is the sweep still starting?)")
    latency = check_latency(latency or r.latency_metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, tuple[Path | None, str | None]] = {}
    for name, fig in all_figures(r, latency=latency, throughput=throughput).items():
        path = out / f"{name}.png"
        note = getattr(fig, "harness_note", None)
        if note is not None:  # nothing to draw: the report says why in words, and no stale image stays behind
            path.unlink(missing_ok=True)
            images[name] = (None, note)
            continue
        fig.savefig(path, dpi=110, facecolor="white", bbox_inches="tight", pad_inches=0.2)
        images[name] = (path, None)
    doc = build_document(r, images, latency)
    md = out / "report.md"
    md.write_text(doc.markdown())
    (out / "report.html").write_text(doc.html())
    return md


register_view("report", write_report)


def _cross_check_rows(cc: dict[str, Any] | None) -> list[list[Any]]:
    """The confirmation's `vllm bench serve` cross-check: each side by both tools, and the gain each measured."""
    if not cc:
        return []
    rows = []
    for side in ("winner", "baseline"):
        got = cc.get(side) or {}
        if "ours" not in got:
            rows.append([f"vllm bench serve cross-check, {side}", got.get("skipped") or got.get("failed") or "-"])
            continue
        o, v = got["ours"], got["vllm"]
        rows.append([f"vllm bench serve cross-check, {side} ({got.get('requests')} requests at "
                     f"{got.get('rate', 0):.3g} req/s, {got.get('gpus')} GPU(s))",
                     f"goodput {o['goodput']:.4g} ours / {v['goodput']:.4g} vLLM's req/s; p99 TTFT "
                     f"{o['ttft_p99']:.0f} / {v['ttft_p99']:.0f} ms; mean TPOT {o['tpot_mean']:.2f} / "
                     f"{v['tpot_mean']:.2f} ms{work_text(got)}"])
    gain = cc.get("goodput_gain_per_gpu")
    if gain:
        names = {"ours": "ours", "vllm": "vLLM's"}
        rows.append(["goodput gain per GPU, by each tool",
                     " / ".join(("-" if g is None else f"{g:+.1%}") + f" {names[t]}" for t, g in gain.items())])
    return rows
