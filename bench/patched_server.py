"""`python -m server` with onnxruntime session config entries the server does not expose, for experiments.

    python -m bench.patched_server --session-config session.intra_op.allow_spinning=0 -- --model DIR ...

Every InferenceSession the server creates gets the entries; nothing else changes.
Only bench/experiments.py uses this, to measure a setting before it is proposed
for server/runner.py.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.patched_server")
    parser.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv[:split])
    entries = [entry.split("=", 1) for entry in args.session_config]

    import onnxruntime as ort

    original_init = ort.InferenceSession.__init__

    def init_with_entries(self, path_or_bytes, sess_options=None, *rest, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        for key, value in entries:
            sess_options.add_session_config_entry(key, value)
        original_init(self, path_or_bytes, sess_options, *rest, **kwargs)

    ort.InferenceSession.__init__ = init_with_entries
    from server.__main__ import main as server_main

    return server_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
