"""Writes the PrometheusRule's `spec` as a plain Prometheus rule file, for promtool or a Prometheus
without the Operator:

    python deploy/prometheus/extract_rules.py                # -> deploy/prometheus/attnserve.rules.yaml
    python deploy/prometheus/extract_rules.py --out FILE

The PrometheusRule (deploy/k8s/base/prometheusrule.yaml) stays the one place the rules are written.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFEST = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"
DEFAULT_OUT = HERE / "attnserve.rules.yaml"


class _BlockStrings(yaml.SafeDumper):
    """Multi-line PromQL keeps its `|` block layout."""


_BlockStrings.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def rule_file(manifest: Path = MANIFEST) -> str:
    spec = yaml.safe_load(manifest.read_text())["spec"]
    header = f"# Generated from {manifest.relative_to(HERE.parent.parent)} by {Path(__file__).name}; edit that file.\n"
    return header + yaml.dump({"groups": spec["groups"]}, Dumper=_BlockStrings, sort_keys=False, width=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.write_text(rule_file())
    print(args.out)


if __name__ == "__main__":
    main()
