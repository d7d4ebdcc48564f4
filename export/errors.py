"""The one exception the exporter and importers raise for bad input.

`python -m export` prints its message as a single line and exits non-zero; the
message says what is wrong and what to do.
"""


class ExportError(Exception):
    pass
