"""What the CLI's log line costs: one ``log.info`` of a finished connection's line, as the
proxy writes it (``splicepool._log.log_to_stderr``), stderr sent to /dev/null.

    python bench/log_line.py [--lines 50000] [--reps 5]

Prints the best of ``--reps`` runs of ``--lines`` lines, in µs per line. The proxy writes
one such line per connection, on the thread that finished it (the first worker's, where
the accept loop runs), so this is part of every connection's cost. To time another
checkout's handler, run the script with ``PYTHONPATH`` set to that checkout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import timeit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50000, help="lines per run (default 50000)")
    parser.add_argument("--reps", type=int, default=5, help="runs; the best is reported (default 5)")
    args = parser.parse_args()
    out = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # before the handler looks at fd 2: a file, written directly
    os.close(null)
    from splicepool._log import log_to_stderr  # after fd 2 is /dev/null

    log_to_stderr("info")
    log = logging.getLogger("splicepool.proxy")

    def line() -> None:
        log.info("conn %d %s -> %s up=%d down=%d duration=%.3fs reason=%s%s", 12345,
                 "127.0.0.1:55555", "127.0.0.1:8000", 4096, 4096, 0.00123, "EOF", "")

    best = min(timeit.repeat(line, number=args.lines, repeat=args.reps))
    import splicepool

    where = os.path.dirname(os.path.dirname(os.path.abspath(splicepool.__file__)))
    print(f"{best / args.lines * 1e6:.2f} µs per line (best of {args.reps} × {args.lines}; "
          f"splicepool of {where}, Python {sys.version.split()[0]})", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
