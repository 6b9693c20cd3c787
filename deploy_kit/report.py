"""`report.html`: one self-contained page that shows what the pipeline did to a run folder.

    path = write_report("runs/x")          # runs/x/report.html

Sections, each read from the file its stage wrote (docs/ARTIFACTS.md), each optional — a missing
input turns its section into a note instead of an error, so the report works after any stage:

- per approximated layer: the teacher's code histogram on the train split with the chosen LUT
  staircase over it (teacher.json + result.json)
- the search curve: best reward vs evaluations, one line per search log found (search_log*.jsonl)
- accuracy and agreement per runtime (exports/verify.json)
- size and latency per artifact (exports/bench.json)

Figures are PNGs rendered with matplotlib's Agg canvas and embedded as base64, so the file can
be mailed or attached to a CI run and opened anywhere without its run folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy_kit.errors import ConfigError, DeployKitError
from deploy_kit.fsutil import atomic_path, check_writable, read_json
from deploy_kit.schema import BenchRecord, LogLine, VerifyRecord, parse_file, parse_lines
from deploy_kit.lut import ActivationQuant, LayerLUT

REPORT_NAME = "report.html"
HISTOGRAM_IMAGES = 1024  # train images behind each code histogram: enough for a stable shape
LUT_COLOR, RELU_COLOR, HIST_COLOR = "#d62728", "#7f7f7f", "#1f77b4"
VARIANT_COLORS = {"lut": LUT_COLOR, "relu": RELU_COLOR, "float": HIST_COLOR}  # bench.json `variant`


# ----------------------------------------------------------------------------- inputs

@dataclass
class RunFiles:
    """What the run folder holds. `notes` collects why a section could not be drawn."""

    run_dir: Path
    teacher: object | None = None  # deploy_kit.teacher.Teacher
    result: object | None = None  # deploy_kit.result.SearchResult
    logs: dict[str, list[dict]] = field(default_factory=dict)  # label → evaluation entries
    student: dict | None = None  # student.json of `deploykit finetune`, when result.json names one
    verify: dict | None = None
    bench: dict | None = None
    notes: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    obj = read_json(path, ConfigError)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_record(path: Path, model) -> dict:
    """verify.json / bench.json, typed (deploy_kit/schema.py) before any section reads it."""
    _, obj = parse_file(path, model, ConfigError, fix=f"; re-run the stage that wrote it or remove {path.name}")
    return obj


def _read_log(path: Path) -> list[dict]:
    """Evaluation lines of a search_log.jsonl (each line typed, deploy_kit/schema.py: LogLine);
    the closing summary line has no `evaluation`."""
    lines = parse_lines(path, LogLine, ConfigError, fix=f"; re-run `deploykit search --force` or remove {path.name}")
    return [line.model_dump() for line in lines if line.evaluation is not None and line.best_reward is not None]


def _log_label(path: Path, main_log: Path | None) -> str:
    """Name a curve by the method recorded next to its log, else by its file name."""
    stem = path.stem.removeprefix("search_log").strip(".")
    result = path.with_name(f"{stem}.json" if stem else "result.json")
    try:
        method = _read_json(result).get("search", {}).get("method") if result.is_file() else None
    except ConfigError:
        method = None
    label = method or path.stem.replace("search_log", "").strip("._-") or "search"
    return f"{label} (chosen)" if main_log is not None and path.resolve() == main_log.resolve() else label


def collect(run_dir: Path) -> RunFiles:
    """Read every stage's output that exists; a file that exists but is broken is still an error."""
    from deploy_kit.result import check_against_teacher, load_result
    from deploy_kit.teacher import load_teacher

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder; pass the folder given to `deploykit train --out`")
    files = RunFiles(run_dir)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        files.result = load_result(result_path)
    else:
        files.notes["layers"] = f"no result.json in {run_dir}: run `deploykit search --teacher {run_dir}` first."
    try:
        teacher_ref = (files.result.teacher or {}).get("path") if files.result else None
        files.teacher = load_teacher(result_path.parent / teacher_ref if teacher_ref else run_dir)
    except DeployKitError as exc:
        files.notes["teacher"] = str(exc)
    if files.result is not None and files.teacher is not None:
        check_against_teacher(files.result, files.teacher)  # a layer or model the teacher lacks: exit 2
    if files.result is not None and files.result.student and files.teacher is not None:
        from deploy_kit.student import load_student

        try:
            files.student = load_student(files.result, files.teacher).meta["student"]
        except DeployKitError as exc:
            files.notes["finetune"] = str(exc)
    elif files.result is not None:
        files.notes["finetune"] = (f"result.json names no fine-tuned student: `deploykit finetune --config "
                                   f"{result_path}` trains one.")
    main_log = result_path.with_name("search_log.jsonl")
    for log in sorted(run_dir.rglob("search_log*.jsonl")):
        entries = _read_log(log)
        if entries:
            files.logs[_log_label(log, main_log)] = entries
    if not files.logs:
        files.notes["search"] = f"no search_log.jsonl under {run_dir}: the search curve needs `deploykit search`."
    for name, attr, stage in (("verify.json", "verify", "verify"), ("bench.json", "bench", "bench")):
        path = run_dir / "exports" / name
        if path.is_file():
            setattr(files, attr, _read_record(path, VerifyRecord if attr == "verify" else BenchRecord))
        else:
            files.notes[attr] = f"no exports/{name} in {run_dir}: run `deploykit {stage} --exports {run_dir / 'exports'}`."
    return files


# ----------------------------------------------------------------------------- figures

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot and no global state

    return Figure(figsize=(width, height), layout="constrained")


def teacher_histograms(teacher, layers: list[str], images: int = HISTOGRAM_IMAGES, seed: int = 0) -> dict[str, np.ndarray]:
    """Counts of each code 0..255 at each named tap, on the first `images` of a seeded
    permutation of the teacher's train split (the same estimate the search starts from)."""
    import torch

    from deploy_kit.data import load_dataset, normalize
    from deploy_kit.search.state import code_histograms

    ds = load_dataset(teacher.meta["data"], teacher.meta["seed"])
    train = ds.split("train")
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:images])
    x = torch.from_numpy(normalize(train.images[pick], teacher.norm))
    return code_histograms(teacher.model, layers, {n: teacher.layer_quant[n] for n in layers}, x)


def staircase(lut: LayerLUT, quant: ActivationQuant, codes: np.ndarray) -> np.ndarray:
    return lut.apply_codes(codes.astype(np.int64), quant.zero_point)


def layer_figure(name: str, lut: LayerLUT, quant: ActivationQuant, hist: np.ndarray | None) -> str:
    """Histogram of the teacher's codes (log scale) with the LUT staircase and the ReLU drawn
    as output code over input code; the x range ends a little past tmax and the bulk of the codes."""
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    # up to twice tmax: the staircase stays readable, and the caption gives the share beyond it
    upper = min(max(2 * lut.tmax, lut.tmax + 16), quant.qmax)
    codes = np.arange(0, upper + 1)
    if hist is not None:
        ax.bar(codes, np.maximum(hist[:upper + 1], 0), width=1.0, color=HIST_COLOR, alpha=0.45,
               label="teacher codes (train)")
        ax.set_yscale("log")
        ax.set_ylabel("count (log)")
    else:
        ax.set_yticks([])
    out = ax.twinx()
    out.step(codes, codes, where="post", color=RELU_COLOR, lw=1, ls="--", label="ReLU (identity on codes)")
    out.step(codes, staircase(lut, quant, codes), where="post", color=LUT_COLOR, lw=2, label="LUT")
    for t, label in ((lut.t1, "t1"), (lut.t2, "t2"), (lut.tmax, "tmax")):
        ax.axvline(t + 0.5, color=LUT_COLOR, lw=0.6, ls=":")
        ax.text(t + 0.5, 0.98, f" {label}", transform=ax.get_xaxis_transform(), fontsize=8, color=LUT_COLOR,
                ha="left", va="top")
    out.set_ylabel("output code")
    out.set_ylim(0, upper + 1)
    ax.set_xlim(-0.5, upper + 0.5)
    ax.set_xlabel(f"input code q   (value = {quant.scale:.4g}·(q − {quant.zero_point}))")
    handles = ax.get_legend_handles_labels()[0] + out.get_legend_handles_labels()[0]
    out.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    ax.set_title(name, loc="left", fontsize=11)
    return _png(fig)


def search_figure(logs: dict[str, list[dict]]) -> str:
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    for label, entries in logs.items():
        ax.plot([e["evaluation"] for e in entries], [e["best_reward"] for e in entries], lw=2 if "chosen" in label else 1.2,
                label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best reward so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def bench_figure(rows: list[dict]) -> str:
    """Two bar charts side by side: artifact size, and p50 latency per runtime."""
    fig = _figure(9.5, 0.45 * max(4, len(rows)) + 1.2)
    size_ax, lat_ax = fig.subplots(1, 2)
    labels = [f"{r['runtime']} · {r['artifact']}" for r in rows]
    colors = [VARIANT_COLORS.get(r.get("variant"), "#bcbd22") for r in rows]
    y = np.arange(len(rows))
    size_ax.barh(y, [r["bytes"] / 1024 for r in rows], color=colors)
    size_ax.set_yticks(y, labels, fontsize=8)
    size_ax.set_xlabel("size (KiB)")
    size_ax.invert_yaxis()
    lat_ax.barh(y, [r["latency_ms_p50"] for r in rows], color=colors)
    lat_ax.set_yticks(y, [""] * len(rows))
    lat_ax.set_xlabel("latency p50, batch 1 (ms)")
    lat_ax.invert_yaxis()
    for ax in (size_ax, lat_ax):
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 10px; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .fail { color: #b00; font-weight: bold; }
.ok { color: #080; } .note { background: #fff8e0; border-left: 4px solid #e0b000; padding: 0.5em 1em; }
.meta { color: #555; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _table(head: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                     for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def header_html(files: RunFiles) -> str:
    parts = [f"<h1>deploykit report: {_e(files.run_dir.name)}</h1>"]
    facts = []
    if files.teacher is not None:
        m = files.teacher.meta
        acc = m.get("accuracy", {})
        facts.append(f"teacher <b>{_e(m['model'])}</b> (width {_e(m.get('width'))}) on <b>{_e(m.get('data'))}</b>, "
                     f"seed {_e(m.get('seed'))}; INT8 test accuracy {_e(acc.get('int8', {}).get('test'))}%, "
                     f"float {_e(acc.get('float', {}).get('test'))}%")
    else:
        facts.append(f"teacher: {_e(files.notes.get('teacher', 'not found'))}")
    if files.result is not None:
        r = files.result
        if r.search:
            facts.append(f"search: {_e(r.search.get('method', '?'))}, {_e(r.search.get('evaluations', '?'))} "
                         f"evaluations, seed {_e(r.search.get('seed', '?'))}")
        if r.selection:
            facts.append(f"selection: {_e(r.selection)}")
        m = r.metrics
        if {"acc_teacher", "acc_student"} <= set(m):
            facts.append(f"test accuracy teacher {_e(m['acc_teacher'])}% → student {_e(m['acc_student'])}% "
                         f"(drop {_e(m.get('acc_drop'))} points)")
        fm = (r.student or {}).get("metrics") or {}
        if "acc_student" in fm:
            facts.append(f"after fine-tuning: student {_e(fm['acc_student'])}% (drop {_e(fm.get('acc_drop'))} points)")
    parts += [f'<p class="meta">{f}</p>' for f in facts]
    return "\n".join(parts)


def layers_html(files: RunFiles) -> str:
    out = ["<h2>Approximated layers</h2>"]
    if files.result is None:
        return "\n".join(out + [_note(files.notes["layers"])])
    names = list(files.result.layers)
    quant = dict(files.result.quant)
    hists: dict[str, np.ndarray] = {}
    if files.teacher is not None:
        quant = {n: quant.get(n) or files.teacher.layer_quant[n] for n in names}
        try:
            search = files.result.search  # the images the search's histograms came from, when recorded
            hists = teacher_histograms(files.teacher, names, int(search.get("state_images", HISTOGRAM_IMAGES)),
                                       int(search.get("seed", 0)))
        except DeployKitError as exc:
            out.append(_note(f"teacher histograms unavailable: {exc}"))
    else:
        out.append(_note(f"teacher histograms unavailable: {files.notes['teacher']}"))
    out.append("<p>Blue: how often the teacher produces each uint8 activation code on the train split. "
               "Red: the chosen LUT (output code for each input code); dashed grey: the plain ReLU it replaces. "
               "Codes above tmax pass through unchanged.</p>")
    for name in names:
        lut, q = files.result.layers[name], quant.get(name)
        if q is None:  # a research-format result.json without the teacher: draw on the code axis alone
            q = ActivationQuant(1.0, 0)
        share = ""
        if name in hists and hists[name].sum():
            h = hists[name]
            share = f"; {100 * h[lut.tmax + 1:].sum() / h.sum():.1f}% of codes are above tmax and pass through"
        caption = f"{name}: t1={lut.t1} v1={lut.v1} t2={lut.t2} v2={lut.v2} tmax={lut.tmax}, scale {q.scale:.4g}{share}"
        out.append(f'<figure class="layer" id="layer-{_e(name)}">{_img(layer_figure(name, lut, q, hists.get(name)), name)}'
                   f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "\n".join(out)


def finetune_figure(epochs: list[dict]) -> str:
    fig = _figure(6.4, 2.6)
    ax = fig.add_subplot()
    xs = [e["epoch"] for e in epochs]
    ax.plot(xs, [e["val_acc"] for e in epochs], marker="o", color="#1f77b4", label="val accuracy %")
    ax.set_xlabel("epoch (0 = searched student, teacher weights)")
    ax.set_ylabel("val accuracy %")
    ax2 = ax.twinx()
    ax2.plot(xs, [e["val_kl"] for e in epochs], marker="s", color="#d62728", label="val KL to teacher")
    ax2.set_ylabel("val KL")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def finetune_html(files: RunFiles) -> str:
    out = ["<h2>Fine-tuning</h2>"]
    st = files.student
    if st is None:
        return "\n".join(out + [_note(files.notes.get("finetune", "no fine-tuned student"))])
    a, r = st["accuracy"], st.get("recipe", {})
    out.append(f"<p>{_e(len(st['epochs']) - 1)} epochs, kept epoch <b>{_e(st['chosen_epoch'])}</b> "
               f"({_e(r.get('selection', 'chosen on validation'))}); "
               f"loss {_e(r.get('kd_weight'))}·KL(T={_e(r.get('temperature'))}) + {_e(r.get('ce_weight'))}·CE + "
               f"{_e(r.get('at_weight'))}·AT, Adam lr {_e(r.get('lr'))} cosine, weight average {_e(r.get('ema') or 'off')}, seed {_e(r.get('seed'))}, "
               f"{_e(st.get('images_per_s'))} img/s on {_e(st.get('device'))}.</p>")
    rows = [[label, f"{a['teacher'][s]:.2f}", f"{a['before'][s]:.2f}", f"{a['after'][s]:.2f}",
             f"{a['teacher'][s] - a['before'][s]:+.2f}", f"{a['teacher'][s] - a['after'][s]:+.2f}"]
            for label, s in (("validation", "val"), ("test", "test"))]
    out.append(_table(["split", "teacher %", "student before %", "student after %", "drop before", "drop after"], rows,
                      numeric={1, 2, 3, 4, 5}))
    dist = st.get("layer_at_distance") or {}
    if dist:
        out.append("<p>Attention-transfer distance to the teacher per conv layer (validation, ×10⁴):</p>")
        out.append(_table(["layer", "before", "after"], [[n, f"{1e4 * d['before']:.3f}", f"{1e4 * d['after']:.3f}"]
                                                         for n, d in dist.items()], numeric={1, 2}))
    gains = st.get("layer_exact_gain") or {}
    if gains:
        out.append("<p>Validation points the kept student wins back when one layer keeps its exact activation "
                   "(every other LUT in place): the largest is the layer to leave out first "
                   "(<code>deploykit search --layers</code>).</p>")
        out.append(_table(["layer", "val gain if exact (pts)"], [[n, f"{g:+.2f}"] for n, g in
                                                                 sorted(gains.items(), key=lambda kv: -kv[1])],
                          numeric={1}))
    out.append(_img(finetune_figure(st["epochs"]), "fine-tuning curve"))
    return "\n".join(out)


def search_html(files: RunFiles) -> str:
    out = ["<h2>Search</h2>"]
    if not files.logs:
        return "\n".join(out + [_note(files.notes["search"])])
    best = {label: max(e["best_reward"] for e in entries) for label, entries in files.logs.items()}
    caption = "; ".join(f"{label}: best {value:.4f} after {len(files.logs[label])} evaluations"
                        for label, value in best.items())
    return "\n".join(out + [f'<figure class="search">{_img(search_figure(files.logs), "search curve")}'
                            f"<figcaption>{_e(caption)}</figcaption></figure>"])


VERIFY_COLUMNS = [("runtime", "runtime"), ("artifact", "artifact"), ("variant", "variant"), ("accuracy", "accuracy %"),
                  ("drop_vs_teacher", "drop vs teacher"), ("agreement_student", "agreement student %"),
                  ("agreement_teacher", "agreement teacher %"), ("mean_kl", "mean KL"),
                  ("max_abs_logit_diff", "max |Δlogit|")]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"
    return _e(value)


def verify_html(files: RunFiles) -> str:
    out = ["<h2>Accuracy and agreement per runtime</h2>"]
    v = files.verify
    if v is None:
        return "\n".join(out + [_note(files.notes["verify"])])
    status = '<span class="ok">all thresholds met</span>' if v.get("passed") else '<span class="fail">FAILED</span>'
    out.append(f"<p>{_e(v.get('images'))} images of the {_e(v.get('split'))} split of {_e(v.get('data'))}; "
               f"thresholds {_e(json.dumps(v.get('thresholds', {})))}: {status}</p>")
    rows = []
    for r in v.get("rows", []):
        verdict = "reference" if not r.get("checked", True) else (
            '<span class="ok">ok</span>' if r.get("passed", True) else '<span class="fail">FAIL</span>')
        rows.append([_cell(r.get(k, "")) for k, _ in VERIFY_COLUMNS] + [verdict])
    out.append(_table([h for _, h in VERIFY_COLUMNS] + ["verdict"], rows, numeric=set(range(3, 9))))
    for failure in v.get("failures", []):
        out.append(f'<p class="fail">{_e(failure)}</p>')
    return "\n".join(out)


def bench_html(files: RunFiles) -> str:
    out = ["<h2>Size and latency</h2>"]
    b = files.bench
    if b is None:
        return "\n".join(out + [_note(files.notes["bench"])])
    rows = b.get("rows", [])
    if not rows:
        return "\n".join(out + [_note("bench.json holds no rows.")])
    s = b.get("settings", {})
    amx = f"Intel AMX {_e(s['amx_mode'])}; " if "amx_mode" in s else ""
    out.append(f"<p>{_e(s.get('threads', '?'))} thread(s), batch 1 latency over {_e(s.get('repeats', '?'))} runs; {amx}"
               f"red: LUT model, grey: the INT8 ReLU teacher, blue: the float model (bench only). "
               f"Machine: {_e(b.get('machine', '?'))}</p>")
    out.append(f'<figure class="bench">{_img(bench_figure(rows), "size and latency")}</figure>')
    table = [[_e(r["runtime"]), _e(r["artifact"]), _e(r.get("variant", "")), f"{r['bytes']:,}",
              f"{r['latency_ms_p50']:.3f}", f"{r.get('throughput_ips', 0):,.0f}"] for r in rows]
    out.append(_table(["runtime", "artifact", "variant", "bytes", "p50 ms", "img/s @32"], table, numeric={3, 4, 5}))
    return "\n".join(out)


def pruning_html(files: RunFiles) -> str:
    """Channels kept per layer and the latency table against the measured export (pruned
    teachers only; empty otherwise)."""
    p = files.teacher.meta.get("pruning") if files.teacher is not None else None
    if not p:
        return ""
    lat, table = p["latency_ms"], p.get("latency_table", {})
    per, per_full = table.get("per_layer_ms", {}), table.get("per_layer_ms_unpruned", {})
    rows = [[_e(n), _e(full), _e(files.teacher.meta["channels"].get(n)), _cell(per_full.get(n)), _cell(per.get(n))]
            for n, full in p["channels_full"].items()]
    searched = p["budget"].get("search_ratio", p["budget"]["ratio"])  # absent before the latency margin
    amx = f"; Intel AMX {_e(lat['amx'])}" if "amx" in lat else ""  # absent before AMX was refused
    margin = f" (searched at ×{_e(round(searched, 4))} predicted)" if searched < p["budget"]["ratio"] else ""
    facts = [f"budget {_e(p['budget']['text'])}{margin} in {_e(p['runtime'])}, method {_e(p['method'])}, "
             f"{_e(p['episodes'])} episodes, seed {_e(p['seed'])}, {_reward_text(p['reward'])}; MACs ×{_e(p['macs']['ratio'])}",
             f"measured latency {_e(lat['measured']['pruned'])} ms vs {_e(lat['measured']['unpruned'])} ms unpruned "
             f"(×{_e(lat['measured_ratio'])}{amx}); the table predicted ×{_e(lat['predicted_ratio'])}, error "
             f"{_e(lat['table_error_pct'].get('pruned'))}% on the pruned model, held-out configurations "
             f"{_e(table.get('holdout_error_pct'))}%",
             f"INT8 test accuracy {_e(files.teacher.meta['accuracy']['int8']['test'])}% vs "
             f"{_e((p['source'].get('accuracy_int8') or {}).get('test'))}% unpruned"]
    ranked = p.get("finalists", {}).get("ranked") or []
    if ranked:
        fin = p["finalists"]
        facts.append(f"{len(ranked)} finalists, each distilled {_e(fin['epochs'])} epoch(s) on {_e(fin['images'])} "
                     "training images, val % after it (search rank): "
                     + ", ".join(f"{_e(r['short_val_acc'])} (#{_e(r['search_rank'])}"
                                 + (f", ×{_e(r['measured_ratio'])} measured" if "measured_ratio" in r else "") + ")"
                                 for r in ranked)
                     + " — the first was distilled in full")
    over = p.get("finalists", {}).get("over_budget") or []
    if over:
        facts.append(f"{len(over)} finalist(s) measured over the budget and not distilled: "
                     + ", ".join(f"search episode {_e(r['episode'])} ×{_e(r['measured_ratio'])}" for r in over))
    recal = p.get("recalibration")  # absent before recalibration; None under a MACs budget
    if recal:
        facts.append(_recalibration_fact(recal))
    return "\n".join(["<h2>Pruning</h2>", *[f'<p class="meta">{f}</p>' for f in facts],
                      _table(["layer", "channels", "kept", "table ms (full)", "table ms (kept)"], rows, {1, 2, 3, 4})])


def _reward_text(reward: dict) -> str:
    if reward.get("kind") == "kd":  # absent before the kd reward: "bn"
        return f"reward: val % after a short distillation on {_e(reward['kd_images'])} images"
    return "reward: val % after BN re-estimation"


def _recalibration_fact(recal: dict) -> str:
    first = f"the first search's finalists measured ×{_e(recal['scale'])} the table's ratio (median)"
    if recal.get("applied"):
        return (f"{first}: searched again at ×{_e(round(recal['search_ratio_predicted'], 4))} predicted; that round measured "
                f"×{_e(recal.get('scale_after'))} the table's ratio; finalists kept from round {_e(recal['chosen_round'])}"
                + (f"; the scaled table's ratio error on the chosen model {_e(recal['ratio_error_pct'])}%"
                   if "ratio_error_pct" in recal else ""))
    why = ("recalibration off" if not recal.get("enabled") else "a recalibrated budget is out of reach"
           if recal.get("unreachable") else f"within ±{_e(round(100 * recal['tolerance']))} %: no second search")
    return f"{first}; {why}"


def render(files: RunFiles) -> str:
    body = "\n".join([header_html(files), pruning_html(files), layers_html(files), search_html(files), finetune_html(files), verify_html(files),
                      bench_html(files)])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>deploykit report: {_e(files.run_dir.name)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_report(run_dir: Path, out: Path | None = None, force: bool = False) -> dict:
    """Render RUN_DIR's report to `out` (default RUN_DIR/report.html), atomically; returns a
    summary: the path, the layers drawn, and a note for each section that had no input."""
    out = Path(out) if out else Path(run_dir) / REPORT_NAME
    check_writable(out, force)
    files = collect(run_dir)
    page = render(files)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"report": str(out), "bytes": out.stat().st_size,
            "layers": list(files.result.layers) if files.result else [], "missing": dict(files.notes)}
