"""The `diffalign` command: one group per capability; parsing only, the work is in the library."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from diffalign import __version__
from diffalign.engine.cliutils import ArgumentParser, make_subparsers
from diffalign.engine.errors import DiffalignError
from diffalign.engine.progress import quiet_library_bars


def build_parser() -> ArgumentParser:
    from diffalign import selftest as selftest_cli
    from diffalign.engine import cli as engine_cli
    from diffalign.fill import cli as fill_cli
    from diffalign.noise import cli as noise_cli
    from diffalign.repa import cli as repa_cli
    from diffalign.textstream import cli as textstream_cli

    parser = ArgumentParser(
        prog="diffalign",
        description="Alignment techniques for pretrained diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = make_subparsers(parser)
    noise_cli.register_demo(sub)
    engine_cli.register(sub)
    selftest_cli.register(sub)
    textstream_cli.register(sub)
    noise_cli.register(sub)
    repa_cli.register(sub)
    fill_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Library warnings (torchvision-less image processors, dtype casts) drown our one-line
    # messages; users can still raise the level through these variables.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    quiet_library_bars()  # DIFFALIGN_NO_PROGRESS: the libraries' own bars too
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = _dispatch(args)
    except BaseException:  # DIFFALIGN_DEBUG tracebacks, SystemExit from a command
        _close_process_group()
        raise
    if _close_process_group() and os.environ.get("TORCHELASTIC_RUN_ID"):
        # A worker of `accelerate launch`: its work is done and written. Leave without the
        # interpreter's teardown, where gloo's threads can abort the process (SIGABRT,
        # "terminate called without an active exception") and fail a finished run.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(args) -> int:
    """Run the chosen command; errors become one line and an exit code."""
    try:
        result = args.func(args)
    except DiffalignError as e:
        print(f"diffalign: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # on a path we were given or write: one line, like bad input
        if e.filename is None and e.errno is None:
            return _internal(e)
        from diffalign.engine.io import os_error_message

        print(f"diffalign: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffalign: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: one line unless DIFFALIGN_DEBUG asks for the traceback
        if _disk_full(e):  # a library's own writer (save_pretrained -> safetensors) filled the disk
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(
                f"diffalign: error: no space left on the device ({first}); free some space "
                "and run the command again",
                file=sys.stderr,
            )
            return 2
        return _internal(e)
    return int(result or 0)


def _close_process_group() -> bool:
    """Tear down a torch.distributed group a sharded run opened; True if there was one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # torch never imported (e.g. --help): nothing to close
        return False
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return False
        dist.destroy_process_group()
    except Exception:  # closing is best effort; the run's result already stands
        pass
    return True


def _disk_full(e: BaseException | None) -> bool:
    """True if `e` (or what caused it) is ENOSPC; libraries such as safetensors wrap it in their
    own exception type with only the OS message ("No space left on device (os error 28)")."""
    import errno

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _internal(e: BaseException) -> int:
    if os.environ.get("DIFFALIGN_DEBUG"):
        raise e
    first = str(e).splitlines()[0] if str(e) else ""
    print(
        f"diffalign: internal error: {type(e).__name__}: {first} "
        "(set DIFFALIGN_DEBUG=1 for the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
