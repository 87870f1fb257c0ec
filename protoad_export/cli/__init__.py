"""``protoad-export``: a thin click layer over the Python API (one module per command group).

Every user-caused problem (``ProtoADError``), a full disk, Ctrl-C and SIGTERM end in one line on
stderr and a non-zero exit code; tracebacks are for bugs only.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys
import threading

import click

from ..errors import ProtoADError


class Terminated(BaseException):
    """SIGTERM (a job scheduler or ``kill`` stopping a build) raised as an exception, so that the
    ``finally`` blocks run: a build removes its scratch features and staging folder at once instead
    of leaving them for the next build of the same name. Not an ``Exception``: nothing catches it
    by accident."""


def _raise_terminated(signum, frame):
    raise Terminated()


def handle_errors(func):
    """Turn expected failures into ``error: ...`` and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return func(*args, **kwargs)
        except Terminated:
            click.echo("terminated (SIGTERM); nothing was replaced", err=True)
            sys.exit(128 + signal.SIGTERM)
        except ProtoADError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                click.echo(f"error: disk full while writing ({exc.filename or exc}); nothing was replaced", err=True)
                sys.exit(6)
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                click.echo(f"error: cannot write {exc.filename}: {exc.strerror}", err=True)
                sys.exit(6)
            if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):  # a file where a folder goes, or back
                click.echo(f"error: {exc.filename}: {exc.strerror}", err=True)
                sys.exit(2)
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was replaced", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


class BatchProfile(click.ParamType):
    name = "MIN:OPT:MAX"

    def convert(self, value, param, ctx):
        from ..build.pipeline import parse_batch_profile

        if isinstance(value, tuple):
            return value
        try:
            return parse_batch_profile(value)
        except ProtoADError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="protoad-export")
def main() -> None:
    """ProtoAD anomaly detection: normal images -> prototypes -> ONNX -> TensorRT engines."""



# Each module registers its commands on ``main``; import order is the order in --help.
from . import build  # noqa: E402,F401
from . import engines  # noqa: E402,F401
from . import export  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import verify  # noqa: E402,F401
