"""The ``hutch`` command line: ``hutch validate`` runs the validation harness."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from hutch import validate


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hutch", description="Hessian trace estimation for PyTorch models.")
    parser.add_argument("--log-level", default="WARNING", help="logging level for the hutch logger (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate_parser = commands.add_parser(
        "validate", help="compare exact and estimated Hessian traces on a toy layer and digits classifiers"
    )
    validate.build_parser(validate_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "validate":
        return validate.run(args, validate_parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
