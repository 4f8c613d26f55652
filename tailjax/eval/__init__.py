"""One evaluation run: a reference and its candidates over a corpus's windows, per-token values into sketches, a
report at the end (``tailjax eval`` as Python).

- ``config``: ``EvalConfig``, everything a run computes (from YAML and the CLI's flags), checked on construction;
- ``runner``: ``run(config, output)``: models loaded, windows cut, the run driven to its report;
- ``step``: the compiled batch step (``batch_step`` -> ``BatchStats``) and the loop over batches (``evaluate``);
- ``state``: ``EvalState``, what a run has accumulated (per-window sketches as bootstrap blocks), saved and resumed;
- ``run_dir``: the output directory (``run.json``, periodic saves, SIGTERM, resume);
- ``stopping``: ``--until-ci``, stop once the intervals are narrow enough;
- ``references``: what a candidate is compared with: a model, a llama.cpp base file (``llamacpp``) or a top-K
  reference cache (``reference_cache``);
- ``summaries``: the final state -> the ``report.json`` dictionary (``tailjax.report`` renders and reads it);
- ``plan``: memory and batch size of a run before it runs.
"""

from tailjax.eval.config import DEFAULT_CANDIDATES, DEFAULTS, PROTOCOL_CHOICES, EvalConfig, default_reference
from tailjax.eval.run_dir import RunDir
from tailjax.eval.runner import run
from tailjax.eval.state import EvalState
from tailjax.eval.step import EvalOptions, Evaluator

__all__ = ["DEFAULTS", "DEFAULT_CANDIDATES", "PROTOCOL_CHOICES", "EvalConfig", "EvalOptions", "EvalState", "Evaluator",
           "RunDir", "default_reference", "run"]
