"""tailjax: judge and train language models by the shape of their per-token loss.

The packages follow the data path, one way:

  corpus -> token windows -> model(s) -> hidden states -> fused head -> per-token values -> sketches -> summaries
   data/                     models/                      head/          online, losses       stats/     eval/
  -> report
     report/

``tailjax.eval.run(EvalConfig(...), output)`` drives one evaluation along it (``tailjax eval``); ``tailjax.distill``
trains through ``head`` (``tailjax distill``); ``tailjax.generate`` decodes with a KV cache; ``tailjax.selection``
reads reports and runs (``tailjax select``). ``tailjax.losses``, ``tailjax.head`` and ``tailjax.stats`` are
importable into any JAX code. ``cli``, ``mesh``, ``files``, ``configs``, ``compile_cache`` and ``frozen`` are the
command and the runtime.
"""

__version__ = "0.1.0"
