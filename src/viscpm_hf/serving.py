"""`viscpm-serve`: transformers' own `transformers serve` (OpenAI-compatible), in a process that imported viscpm_hf.

`transformers serve` has no plugin mechanism (no entry points, no option naming a module to import): its server only
knows the classes of the packages imported in its process, and the `transformers` command imports none. This command
imports viscpm_hf, whose `registration.register()` makes serve find VisCPM-Chat and CPM-Bee, then hands all its
arguments to transformers' serve command, unchanged:

    viscpm-serve path/to/viscpm-chat --host 127.0.0.1 --port 8000
    python -m viscpm_hf.serving path/to/viscpm-chat --port 8000     # the same, without the console script

It needs transformers' serving extras (`pip install "viscpm-hf[serve]"`: FastAPI, Uvicorn, openai).
"""

import sys


def main(argv: list[str] | None = None) -> None:
    import typer
    from transformers.cli.serve import Serve  # the command `transformers serve` runs

    import viscpm_hf  # noqa: F401  (registers the project's classes, see registration.py)

    app = typer.Typer(add_completion=False)
    app.command()(Serve)
    app(sys.argv[1:] if argv is None else argv, prog_name="viscpm-serve")


if __name__ == "__main__":
    main()
