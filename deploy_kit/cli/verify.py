"""`deploykit verify`: every export against the student, on real data."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import Finite, emit, handle_errors, json_option, say, say_skipped_runtimes


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def render_table(rows) -> list[str]:
    head = (f"{'runtime':<28} {'artifact':<24} {'size':>10} {'acc %':>7} {'Δ teach':>8} {'agr stud':>9} "
            f"{'agr teach':>9} {'mean KL':>9} {'max|Δlogit|':>11} {'img/s':>9}  ")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "" if not r.checked else ("ok" if r.passed else "FAIL")
        lines.append(f"{r.runtime:<28} {r.artifact:<24} {_size(r.bytes):>10} {r.accuracy:>7.2f} {0.0 - r.drop_vs_teacher + 0.0:>+8.2f} "
                     f"{r.agreement_student:>9.2f} {r.agreement_teacher:>9.2f} {r.mean_kl:>9.2e} "
                     f"{r.max_abs_logit_diff:>11.4f} {r.images_per_s:>9.0f}  {mark}")
    return lines


def render_localize(row) -> list[str]:
    loc = row.localize or {}
    lines = [f"localize {row.runtime} [{row.artifact}] on {loc.get('images', 0)} images "
             f"(first diverging: {loc.get('first_diverging_layer') or '-'})"]
    for name, e in loc.get("layers", {}).items():
        if not e.get("found"):
            lines.append(f"  {name:<12} (no LUT tensors found in this artifact)")
        elif "share_differing" in e:
            table = f"   table mismatch {100 * e['table_mismatch']:6.2f}%" if "table_mismatch" in e else ""
            lines.append(f"  {name:<12} codes differing {100 * e['share_differing']:6.2f}%   "
                         f"mean code error {e['mean_code_error']:.3f}{table}")
    if loc.get("note"):
        lines.append(f"  {loc['note']}")
    return lines


@click.command("verify")
@click.option("--exports", type=click.Path(path_type=Path), required=True,
              help="The folder written by `deploykit export` (holds manifest.json).")
@click.option("--data", default=None, help="Dataset spec (default: the teacher's, with its seed).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]), help="Split to verify on.")
@click.option("--max-drop", default=1.0, show_default=True, type=Finite(0, 100), help="Max accuracy drop vs the teacher, in points.")
@click.option("--min-agreement", default=99.0, show_default=True, type=Finite(0, 100),
              help="Min top-1 agreement (%) with the student (LUT exports) or the teacher (ReLU exports).")
@click.option("--localize", is_flag=True,
              help="Compare codes at every LUT with the student; name the first diverging layer, and fail an "
                   "export whose LUT breaks its table even if top-1 agreement passes.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="Threads per runtime (default: the runtime's own).")
@json_option
@handle_errors
def command(exports, data, split, max_drop, min_agreement, localize, threads, as_json):
    """Check the exports (the manifest's own digest, every file's sha256, the result.json and
    teacher.json they were made from: exit 2 on a mismatch), run the whole split through every
    runtime, print one table and write verify.json next to manifest.json. Exits 1 when a threshold fails.
    Re-running replaces verify.json (no --force needed); the artifacts themselves are never modified.

    \b
    Example:
      deploykit verify --exports runs/lenet5/exports
      deploykit verify --exports runs/lenet5/exports --min-agreement 99.5 --localize
    """
    from deploy_kit.verify import VerifyConfig, VERIFY_NAME, verify_exports

    cfg = VerifyConfig(exports=exports, data=data, split=split, max_drop=max_drop, min_agreement=min_agreement,
                       localize=localize, threads=threads)
    report = verify_exports(cfg)
    say(f"{report.data} {report.split}: {report.images} images, {report.seconds:.1f}s")
    for line in render_table(report.rows):
        say(line)
    for row in report.rows:
        if row.localize:
            for line in render_localize(row):
                say(line)
    say_skipped_runtimes()
    say(f"{'PASSED' if report.passed else 'FAILED'} → {Path(exports) / VERIFY_NAME}")
    emit(report.summary())
    report.raise_for_failures()
