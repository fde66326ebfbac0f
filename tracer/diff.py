"""`python -m tracer.diff`: the flopdiff command line (tracer.cli), under the name the project started with."""

from tracer.cli import build_parser, cli, main, workload_from_args
from tracer.vendors import parse_impl

__all__ = ["build_parser", "cli", "main", "parse_impl", "workload_from_args"]

if __name__ == "__main__":
    cli()
