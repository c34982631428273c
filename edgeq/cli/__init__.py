"""The `edgeq` command line. Every command is registered here, in one place."""

from __future__ import annotations

import typer

from edgeq.cli import calibration, check, common, pipeline

app = typer.Typer(help="PyTorch model -> verified INT8 edge model, as a Prefect DAG of cached, gated tasks.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="also show Prefect's traceback when a gate or a config refuses the run")):
    """PyTorch model -> verified INT8 edge model, as a Prefect DAG of cached, gated tasks."""
    common.VERBOSE = verbose


app.command("export")(pipeline.export)
app.command("check")(check.check)
app.command("calibrate")(calibration.calibrate)
app.command("quantize")(pipeline.quantize)
app.command("convert")(pipeline.convert)
app.command("demo")(pipeline.demo)

calibration_app = typer.Typer(help="Calibration-set versions: list, show, review.", no_args_is_help=True)
calibration_app.command("list")(calibration.list_cmd)
calibration_app.command("show")(calibration.show_cmd)
calibration_app.command("review")(calibration.review_cmd)
app.add_typer(calibration_app, name="calibration")
