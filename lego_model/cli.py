"""What every command line of the project does with an error: one line on stderr, a non-zero exit, no traceback.

Each CLI (``lego-export``, ``python -m runtimes.sample``, the digits
commands) runs its body inside :func:`one_line_errors`.  A project error
(:class:`lego_model.errors.LegoError`) or an OSError (a full disk, a
permission) prints ``error: <its first line>`` and exits 1; Ctrl-C prints one
line saying what was kept and how to continue (the command says which) and
exits 130, the shell's code for SIGINT.  Before the body runs (while Python
imports torch), Ctrl-C is the one line of ``lego_model._interrupted_while_starting``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

import lego_model
from lego_model.errors import LegoError, first_line


@contextmanager
def one_line_errors(on_interrupt: Callable[[], str] | None = None) -> Iterator[None]:
    """Run a command's body; turn its errors into one line and an exit status.

    ``on_interrupt()`` says, after Ctrl-C, what the command kept and how to
    continue (e.g. "12 images kept in samples/; run again with --resume"); an
    empty text prints nothing (a torchrun rank whose rank 0 speaks for the launch).
    """
    if signal.getsignal(signal.SIGINT) is lego_model._interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is the line below
    try:
        yield
    except (LegoError, OSError) as err:
        click.echo(f"error: {first_line(err)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        said = on_interrupt() if on_interrupt is not None else "nothing was kept"
        if said:
            click.echo(f"interrupted: {said}", err=True)
        sys.exit(130)


class OneLineCommand(click.Command):
    """A click command whose usage errors (an option value out of range, an unknown option) are one line too.

    click prints a usage error as its usage line, a hint and an ``Error:``
    line; the project's commands print ``error: <what>`` alone (exit status 2,
    click's code for usage errors), as they print their own errors
    (:func:`one_line_errors`, exit status 1).  ``--help`` is untouched.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as err:
            click.echo(f"error: {err.format_message()} (see --help)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)  # --help and --version return click's exit code
