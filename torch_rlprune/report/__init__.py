"""Run records, the summary table, plots and ``report.md`` for :func:`~torch_rlprune.rl_prune` results.

A *run record* (:func:`summarize`, ``summary.py``) is a plain JSON-able dict describing one
:class:`PruneResult`: its plan, per-layer amounts, MACs/params before and after, scores, timings
and episode history. ``result.summary()`` and the CLI print :func:`format_summary` of it;
:func:`save_run` / :func:`load_run` keep records in ``run.json`` (``runfile.py``);
:func:`write_report` turns them into ``report.md`` (``markdown.py``) with PNG plots (``plots.py``).
"""
from .markdown import REPORT_FILE, publish_section, write_marked_section, write_report
from .plots import plot_amounts, plot_search, plot_tradeoff, search_stats
from .runfile import RECORD_KEYS, RUN_FILE, RUN_FORMAT_VERSION, load_run, save_run
from .summary import count_dense, format_summary, summarize

__all__ = ["write_marked_section", "publish_section", "RUN_FILE", "RUN_FORMAT_VERSION", "RECORD_KEYS", "REPORT_FILE",
           "summarize", "format_summary", "count_dense", "plot_amounts", "plot_search", "plot_tradeoff", "save_run",
           "load_run", "write_report", "search_stats"]
