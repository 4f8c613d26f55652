"""A run's report for programs and for people: ``report.json`` (the contract: ``document``), the verdicts between
candidates (``verdicts``), and its pages (``run_pages``: terminal, Markdown, HTML; ``plots``), built from the
primitives that ``tailjax.selection`` shares (``pages``: tables, pages, figures, colours, number formats).

An eval run's state becomes the ``report.json`` dictionary in ``tailjax.eval.summaries``; from there on everything
here works from the dictionary alone, so a saved report is re-rendered and combined without the models.
"""

from tailjax.report import pages, plots, run_pages
from tailjax.report.document import combine, read, write
from tailjax.report.run_pages import GLOSSARY, HOW_TO_READ, render, to_html, to_markdown
from tailjax.report.verdicts import PairedShares, compare_candidates

__all__ = ["GLOSSARY", "HOW_TO_READ", "PairedShares", "combine", "compare_candidates", "pages", "plots", "read",
           "render", "run_pages", "to_html", "to_markdown", "write"]
