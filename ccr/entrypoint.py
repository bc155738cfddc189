"""The `ccr` command: a command line for the node service is forwarded before anything
heavy is imported; any other runs in this process (ccr.cli).

A user's every command goes to the service (ccr/service), whose worker has all of ccr
loaded already: importing typer and ccr's controller first only to forward argv cost the
client ~60 ms a call (`ccr.service.client` alone imports in ~15 ms).
"""

from __future__ import annotations

import json
import sys


def report_failure(message: str, code: int, as_json: bool) -> int:
    """Report an error: one line `ccr: error: ...`, or under --json {"error", "code"}."""
    if as_json:
        print(json.dumps({"error": message, "code": code}), file=sys.stderr)
    else:
        print(f"ccr: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error becomes one line on stderr and a non-zero exit code.

    A user other than root (or root, with CCR_SOCKET naming a running service) runs the
    command in the node service, which prints and exits exactly as ccr in-process does.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    from ccr.errors import CcrError, exit_code_for
    from ccr.service import client

    if client.wants_service(args):
        try:
            code = client.call(args)
        except CcrError as exc:
            code = report_failure(str(exc), exit_code_for(exc), "--json" in args)
        sys.stdout.flush()
        sys.exit(code)
    from ccr import cli

    code = cli.run_in_process(args)
    sys.stdout.flush()
    sys.exit(code)
