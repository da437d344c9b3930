"""`viscpm-serve`: transformers' own `transformers serve` (OpenAI-compatible), in a process that knows viscpm_hf.

`transformers serve` has no plugin mechanism (no entry points, no option naming a module to import): its server only
knows the classes of the packages imported in its process. This command hands all its arguments to serve's command,
unchanged, after importing viscpm_hf and `integrations.transformers_serve`:

    viscpm-serve path/to/viscpm-chat --host 127.0.0.1 --port 8000
    python -m viscpm_hf.serving path/to/viscpm-chat --port 8000     # the same, without the console script

Since transformers 5.25 the model runs in a process of its own, started with `spawn`: `transformers_serve.register()`
makes that process import viscpm_hf and register too, whatever main module started the server.
It needs transformers' serving extras (`pip install "viscpm-hf[serve]"`: FastAPI, Uvicorn, openai).
"""

import sys

from .integrations import hub_kernels, transformers_serve


hub_kernels.disable_hub_kernels_when_offline()
transformers_serve.register()


def main(argv: list[str] | None = None) -> None:
    import typer
    from transformers.cli.serve import Serve  # the command `transformers serve` runs

    app = typer.Typer(add_completion=False)
    app.command()(Serve)
    app(sys.argv[1:] if argv is None else argv, prog_name="viscpm-serve")


if __name__ == "__main__":
    main()
