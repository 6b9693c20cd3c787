"""`deploykit report`: one self-contained HTML page for a run folder."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_kit.cli import emit, handle_errors, json_option, say


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="HTML file to write [default: RUN_DIR/report.html].")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@json_option
@handle_errors
def command(run_dir, out, force, as_json):
    """Write report.html: per approximated layer the teacher's code histogram with the chosen LUT
    over it, the search curve, accuracy/agreement per runtime and size/latency bars. Images are
    embedded; sections whose stage has not run yet say so.

    \b
    Example:
      deploykit report runs/lenet5
    """
    from deploy_kit.report import write_report

    summary = write_report(run_dir, out, force=force)
    say(f"{len(summary['layers'])} layer figure(s); {summary['bytes'] / 1024:.0f} KiB")
    for section, note in summary["missing"].items():
        say(f"  {section}: {note}")
    say(f"report → {summary['report']}")
    emit(summary)
