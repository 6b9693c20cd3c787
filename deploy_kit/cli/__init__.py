"""The `deploykit` command line. Commands only parse options and render results; the work is
done by the plain Python API in deploy_kit/ and exporters/.

Conventions shared by every command:
  --json   one JSON summary object on stdout; human-readable output goes to stderr.
  errors   a DeployKitError becomes one line on stderr and its exit code (2 bad input,
           1 verification failed); no traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings

import click

from deploy_kit import __version__
from deploy_kit.errors import DeployKitError

COMMANDS = ("train", "import_research", "prune", "search", "finetune", "export", "verify", "bench", "report", "demo")


class Finite(click.FloatRange):
    """A number option in a range that must also be finite: click's FloatRange lets `nan`
    through (every comparison with it is false) and reads `1e400` as inf."""

    name = "finite number"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


SEED = click.IntRange(0, 2**63 - 1)


def quiet_third_party() -> None:
    """TensorFlow and torch.ao print deprecation chatter that drowns the real output."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def say(message: str = "") -> None:
    """Human output: always stderr when --json is on, stdout otherwise."""
    ctx = click.get_current_context(silent=True)
    as_json = bool(ctx and ctx.find_root().meta.get("json"))
    click.echo(message, err=as_json)


def json_option(f):
    """Adds --json; records it on the root context so `say` knows where human output goes."""
    def callback(ctx, _param, value):
        ctx.find_root().meta["json"] = value
        return value
    return click.option("--json", "as_json", is_flag=True, expose_value=True, is_eager=True, callback=callback,
                        help="Print one JSON summary object on stdout (human output goes to stderr).")(f)


def say_skipped_runtimes() -> None:
    """One line per installed runtime that cannot run here (tflite-runtime next to numpy 2)."""
    from exporters.registry import RUNTIMES

    for spec in RUNTIMES.values():
        _, why = spec.status()
        if why:
            say(f"note: {why}")


def emit(summary: dict) -> None:
    """Print the --json summary, if asked for."""
    ctx = click.get_current_context()
    if ctx.find_root().meta.get("json"):
        click.echo(json.dumps(summary))


def handle_errors(f):
    """Map DeployKitError to one line and its exit code."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except DeployKitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


class DeployKitGroup(click.Group):
    """Usage errors (an unknown choice, a missing option) get the same one-line form as every
    other bad input — `error: …` plus where to look — instead of click's usage preamble."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f"{exc.ctx.command_path} --help" if exc.ctx else "deploykit --help"
            click.echo(f"error: {exc.format_message()} (see `{where}`)", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=DeployKitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deploykit")
def main():
    """deploykit: take an INT8 CNN from training to mobile runtimes, and prove the exports match.

    \b
    Pipeline (each stage reads the previous stage's output folder):
      deploykit train  --model lenet5 --data digits --out runs/x     INT8 QAT teacher
      deploykit import --research X.pth --model lenet5 --data SPEC --out runs/x
                                                                      or a research-system checkpoint
      deploykit prune  --teacher runs/x --budget latency=0.5 --out runs/p   optional: fewer channels (RL)
      deploykit search --teacher runs/x --out runs/x/result.json      per-layer LUT codes (PPO)
      deploykit finetune --config runs/x/result.json                  student weights trained with the LUTs
      deploykit export --config runs/x/result.json --target all       ONNX, ORT Mobile, TFLite INT8
      deploykit verify --exports runs/x/exports                       every runtime vs the student
      deploykit bench  --exports runs/x/exports                       size and latency
      deploykit demo                                                  all of the above on `digits`
    """
    quiet_third_party()


def _register() -> None:
    import importlib

    for name in COMMANDS:
        try:
            module = importlib.import_module(f"deploy_kit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"deploy_kit.cli.{name}":
                raise
            continue  # stage not built yet
        main.add_command(module.command)


_register()
