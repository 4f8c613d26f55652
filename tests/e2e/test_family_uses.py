"""The 2026 families everywhere a model is used, not only loaded: the reference of an eval with its own
``@int4`` as candidate, on a mesh that splits heads, the MLP or the experts and the embedding dimension,
giving the single-device log-probabilities; and a distillation step (teacher: the family; student: its
``@int4``, packed documents) on a mesh whose loss equals ``tailjax.losses`` on materialized float64
logits. The cases hold the model code of its own: Gated DeltaNet with gated attention and a gated shared expert
(Qwen3.5-MoE), Gemma 4's block (per-layer inputs, shared keys and values, experts beside the MLP), Llama 4's
attention and input-scaled experts, and GLM-4.7-Flash's multi-head latent attention. (gpt-oss, GLM-4.5 and Mistral 3 passed this test too, 38 s, 52 s and 21 s:
out of the suite for its time budget.)"""

import dataclasses
import json

import numpy as np
import pytest
from pydoc_data.topics import topics

from tailjax import data, distill, models
from tailjax import eval as evaluation
from tailjax.eval import EvalConfig
from tailjax.models import hf
from helpers import FAMILIES, SMALL, materialized_loss, random_hf_model, tokenizer_files

CASES = {  # family case -> mesh (8 host devices)
    "qwen3.5-moe-gated-shared-expert": "fsdp=2,model=2,expert=2",
    "gemma4-moe-per-layer-inputs-shared-kv": "fsdp=2,model=2,expert=2",
    "llama4-chunks-nope-scaled-input-experts": "data=2,model=2,expert=2",
    "glm4-moe-lite-mla-q-lora-biases": "fsdp=2,model=2,expert=2",
}
PROTOCOL = data.Protocol("test", seq_len=24, num_sequences=8, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_family_as_reference_candidate_teacher_and_student_on_a_mesh(case, tmp_path):
  config_cls, overrides = FAMILIES[case]
  model = tmp_path / "model"
  random_hf_model(config_cls, model, **{**SMALL, **overrides})
  tokenizer_files(model, SMALL["vocab_size"])
  extra = len(hf.read_tokenizer(model)) - SMALL["vocab_size"]  # the family's class adds its specials (Qwen3.5)
  if extra:
    tokenizer_files(model, SMALL["vocab_size"] - extra)
  text = " ".join(topics[k] for k in sorted(topics)[:6])
  (tmp_path / "corpus.txt").write_text(text)

  result = evaluation.run(EvalConfig(str(model), ["@int4-g16"], str(tmp_path / "corpus.txt"), protocol=PROTOCOL,
                                     batch_size=8, save_every=0.0, mesh=CASES[case]))
  loaded = models.load(model)
  windows = data.corpus_windows(str(tmp_path / "corpus.txt"), loaded.tokenizer, PROTOCOL).tokens
  logprobs = np.asarray(loaded.logprobs(windows), np.float64)  # one device
  ce = -np.take_along_axis(logprobs[:, :-1], windows[:, 1:, None], -1)[..., 0]
  reference = next(iter(result["models"].values()))
  np.testing.assert_allclose(reference["sequences"]["ppl"], np.exp(ce.mean(1)), rtol=1e-5)
  assert next(iter(result["candidates"].values()))["kld"]["mean"] > 0  # the candidate is rounded

  with (tmp_path / "corpus.jsonl").open("w") as f:
    for i in range(0, len(text), 60):  # documents of ~20 tokens: several per 33-token window
      f.write(json.dumps({"text": text[i:i + 60]}) + "\n")
  cfg = distill.DistillConfig(data=str(tmp_path / "corpus.jsonl"), teacher=str(model), student=f"{model}@int4-g16",
                              objective="kl", seq_len=32, batch_size=8, steps=1, save_every=1, eval_every=1,
                              log_every=1, warmup_steps=1, val_windows=8, mesh=CASES[case])
  single = distill.prepare(dataclasses.replace(cfg, mesh=None))  # the reference: one device, float64 on the host
  batch = next(distill.batches(single))
  assert (np.asarray(batch["segments"]) > 1).any()  # documents packed into a window: the state restarts
  expected = materialized_loss(single, batch, cfg)
  trained = distill.distill(cfg, tmp_path / "run")
  assert trained.losses[1] == pytest.approx(expected, rel=2e-5)
  assert models.load(tmp_path / "run" / "checkpoints" / "1").config == loaded.config
