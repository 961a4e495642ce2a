"""The `k2quant` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from .errors import K2QuantError


class _Group(click.Group):
    """Turns k2quant's input errors into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except K2QuantError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="k2quant")
def main() -> None:
    """k2quant: quantize, check and run Kimi K2 on hardware you own.

    \b
    Examples:
      k2quant demo                      # build mini-K2 and run the whole pipeline
      k2quant inspect ./Kimi-K2-Instruct
      k2quant inspect ./Kimi-K2-Instruct --json | jq .components
    """


@main.command()
@click.option(
    "--out",
    default="k2quant-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo model and outputs go (reused when already built).",
)
def demo(out: str) -> None:
    """Build a small K2 and run the k2quant pipeline on it.

    \b
    Example:
      k2quant demo --out /tmp/k2demo
    """
    from .demo import run

    run(out, echo=click.echo)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Architecture, parameters, bytes and bits per weight by component.

    \b
    Reads only headers: fast on a 1 TB checkpoint.
    Example:
      k2quant inspect ./Kimi-K2-Instruct --json
    """
    from .inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


if __name__ == "__main__":  # pragma: no cover
    main()
