"""python -m server --model MODEL_DIR: serve a model dir over gRPC (see `--help`)."""
from __future__ import annotations

import asyncio
import logging
import sys

from server.config import parse_config


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import StartupError, serve  # after logging is set up: importing onnxruntime takes a moment

    try:
        return asyncio.run(serve(config))
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
