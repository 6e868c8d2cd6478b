"""The `kvclip` command: the builder's, the server's and the client's commands.

Building the parser imports no torch, open_clip, faiss or fastapi: the light (client-only)
install runs `kvclip --help` and the client commands; a builder or server command run there
fails with one line naming the extra to install (kvclip/extras.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from kvclip.errors import KvclipError
from kvclip.extras import require_extra
from kvclip.vocabulary import VERSION

DESCRIPTION = ("Training-free zero-shot image classification with CLIP and a key-value cache of support "
               "examples (Tip-Adapter, Tip-X, CapS): build a cache from labelled images (build, eval, "
               "export-dataset), serve it over HTTP (serve), and use a server (classify, caches, jobs).")
EPILOG = ("exit status: 0 success; 1 a runtime or server error (the server answered an error, it could "
          "not be reached, a build job failed, model weights could not be had); 2 a usage error (an "
          "argument, or a file or folder it names, that cannot work; checked before any model loads).")


def build_parser() -> argparse.ArgumentParser:
    from kvclip.cache_builder.cli import add_commands as add_builder_commands
    from kvclip.clients.cli import add_commands as add_client_commands
    from kvclip.service.cli import add_commands as add_server_commands

    parser = argparse.ArgumentParser(prog="kvclip", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"kvclip {VERSION}")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    add_builder_commands(sub)
    add_server_commands(sub)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(args.log_level or "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        extra = getattr(args, "extra", None)
        if extra is not None:
            require_extra(extra, args.command)
        code = args.run(args)
        sys.stdout.flush()  # a reader that went away shows up here, not in the interpreter's exit
        return code
    except KvclipError as exc:
        print(f"kvclip: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        # The reader went away (`kvclip caches list | head -1`): stop quietly, as cat or grep do.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
