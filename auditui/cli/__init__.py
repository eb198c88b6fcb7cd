"""`auditui`: bare, it opens the TUI; its subcommands are the headless engine steps (--json).

Every user-facing error is one line on stderr with exit code 2; Ctrl-C prints "interrupted", exit 130.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from auditui.cli.common import DbOpt, DeviceOpt, DtypeOpt, ModelOpt, PackOpt, settings_from
from auditui.errors import AuditError

INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class AuditGroup(TyperGroup):
    """Turns AuditError anywhere below, and click's usage errors, into one `error: ...` line, exit 2;
    an interrupt (Ctrl-C, which typer returns as exit code 130, or an Abort) into `interrupted`, exit 130."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except AuditError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    def main(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except typer.Abort:  # end of input at a prompt, or an abort raised below
            code = INTERRUPTED
        except Exception as exc:
            code = getattr(exc, "exit_code", None)
            if code is None or not hasattr(exc, "format_message"):  # not a click usage error
                raise
            message = exc.format_message()
            typer.echo(message if "\n" in message.strip() else f"error: {message}", err=True)
        if code == INTERRUPTED:
            typer.echo("interrupted", err=True)
        if isinstance(code, int) and code:
            sys.exit(code)


app = typer.Typer(cls=AuditGroup, add_completion=False, no_args_is_help=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Audit language models with sparse autoencoders. Bare `auditui` opens the TUI.")


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context, model: ModelOpt = None, pack: PackOpt = None, device: DeviceOpt = None,
         dtype: DtypeOpt = None, db: DbOpt = None) -> None:
    """Open the TUI when no command is given."""
    if ctx.invoked_subcommand is not None:
        return
    from auditui.tui.app import run_app

    run_app(settings_from(model=model, pack=pack, device=device, dtype=dtype, db=db))


# Command modules register themselves on `app` when imported.
from auditui.cli import attribute, diff, flow, game, heads, judge, sessions, setup, steer  # noqa: E402,F401
from auditui.cli import pack as pack_commands  # noqa: E402,F401  (`pack` is also an option name above)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
