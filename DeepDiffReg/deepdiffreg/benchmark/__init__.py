"""``deepdiffreg benchmark``: our methods (from the registry) and classical peers on fixed pairs, in one run,
written as a markdown table + JSON (docs/benchmarks.md, docs/benchmarks.json).

- ``pairs``: the benchmark pairs, built in a work folder;
- ``rows``: which methods and variants run, with which options (all from methods/base.py's registry);
- ``peers``: the classical peers (ANTs SyN) and what each is given;
- ``runner``: one child process per run, timed as a whole, peak memory measured;
- ``analysis``: peers' metrics, displacement error, uncertainty vs error, means, ratios, stage profile;
- ``validation``: the learned methods on the training cache's validation pairs;
- ``render``: the markdown (the hand-written header above ``MARKER`` is kept);
- ``cli``: the subcommand.
"""
from .analysis import _rankdata, displacement_error, spearman, uncertainty_vs_error
from .cli import add_benchmark_parser, cmd_benchmark
from .render import MARKER, render_markdown

__all__ = ["add_benchmark_parser", "cmd_benchmark", "render_markdown", "MARKER", "spearman", "_rankdata",
           "uncertainty_vs_error", "displacement_error"]
