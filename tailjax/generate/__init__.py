"""Text from a model: decoding with a KV cache (``decode``: greedy and sampled, stop strings, batched prompts of any
length) and task metrics on what it writes (``tasks``: exact and substring match).

``tailjax.generate.generate(loaded, prompts, config)`` is the whole of ``tailjax generate`` as a function.
"""

from tailjax.generate import tasks
from tailjax.generate.decode import (CHECK_EVERY, PROMPT_ROUNDING, GenerateConfig, Generation, Prompt, Sampling, choose,
                                     default_eos, encode_prompt, generate, generate_ids, next_logits, read_prompts,
                                     record_prompt, write_generations)

__all__ = ["CHECK_EVERY", "PROMPT_ROUNDING", "GenerateConfig", "Generation", "Prompt", "Sampling", "choose",
           "default_eos", "encode_prompt", "generate", "generate_ids", "next_logits", "read_prompts", "record_prompt",
           "tasks", "write_generations"]
