"""Meshes and hosts: the same evaluation on any device layout, and across two processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from pydoc_data.topics import topics

from tailjax import data, mesh, runner
from tailjax.models import Decoder
from test_eval import write_tiny_model_and_corpus
from test_models import TINY, letter_text, write_tiny_gguf

PROTOCOL = data.Protocol("test", seq_len=24, num_sequences=16, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_model_and_corpus(tmp_path_factory.mktemp("mesh"), seed=3, documents=8)


def evaluate(tiny, device_mesh=None, output=None):
  return runner.run_eval(str(tiny / "tiny.gguf"), ["@int3-g16", "@int2-g16-asym"], str(tiny / "corpus.txt"),
                         protocol=PROTOCOL, batch_size=8, save_every=0.0, mesh=device_mesh, output=output)


def assert_same_numbers(a, b):
  """Sketch counts bit for bit, means to 1e-6, per-window PPL to 1e-6."""
  for label in a["candidates"]:
    x, y = a["candidates"][label]["kld"], b["candidates"][label]["kld"]
    assert x["sketch"]["counts"] == y["sketch"]["counts"] and x["n"] == y["n"] > 0
    assert x["mean"] == pytest.approx(y["mean"], rel=1e-6)
  for label in a["models"]:
    x, y = a["models"][label], b["models"][label]
    assert x["ce"]["sketch"]["counts"] == y["ce"]["sketch"]["counts"]
    assert x["ce"]["mean"] == pytest.approx(y["ce"]["mean"], rel=1e-6)
    np.testing.assert_allclose(x["sequences"]["ppl"], y["sequences"]["ppl"], rtol=1e-6)


def test_parse_meshes():
  assert dict(mesh.parse("data=4,model=2").shape) == {"data": 4, "fsdp": 1, "model": 2}
  assert dict(mesh.parse("auto").shape) == {"data": 8, "fsdp": 1, "model": 1}
  assert dict(mesh.parse("model=2,data=-1").shape) == {"data": 4, "fsdp": 1, "model": 2}
  with pytest.raises(ValueError, match=r"needs 6 devices, 8 are available"):
    mesh.parse("data=3,model=2")
  with pytest.raises(ValueError, match="expected comma-separated AXIS=SIZE"):
    mesh.parse("batch=8")


def test_parameters_follow_their_logical_axes():
  model = Decoder(TINY, rngs=nnx.Rngs(0))
  mesh.shard_model(model, mesh.parse("fsdp=2,model=4"))
  spec = lambda variable: variable[...].sharding.spec
  assert spec(model.blocks[0].attn.q.kernel) == jax.sharding.PartitionSpec("fsdp", "model")  # embed, heads
  assert spec(model.blocks[0].mlp.down.kernel) == jax.sharding.PartitionSpec("model", "fsdp")  # mlp, embed
  assert spec(model.embed.embedding) == jax.sharding.PartitionSpec("model", "fsdp")  # vocab, embed
  assert spec(model.norm.scale) == jax.sharding.PartitionSpec(None)
  odd = Decoder(TINY, rngs=nnx.Rngs(0))
  mesh.shard_model(odd, mesh.parse("model=8"))  # kv_heads x head_dim = 16 splits 8 ways; 48 (mlp) does too
  assert spec(odd.blocks[0].attn.k.kernel) == jax.sharding.PartitionSpec(None, "model")


@pytest.mark.parametrize("layout", ["data=8", "data=4,model=2", "data=2,model=4", "fsdp=8", "data=2,fsdp=2,model=2"])
def test_eval_gives_the_same_numbers_on_every_mesh(tiny, layout):
  assert_same_numbers(evaluate(tiny, layout), evaluate(tiny))


WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from tailjax import mesh, runner
from tailjax import data
process, port, root, output = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
mesh.initialize(f"127.0.0.1:{port}", 2, process)
assert jax.device_count() == 8 and jax.local_device_count() == 4
result = runner.run_eval(f"{root}/tiny.gguf", ["@int3-g16", "@int2-g16-asym"], f"{root}/corpus.txt",
                         protocol=data.Protocol("test", seq_len=24, num_sequences=16, seed=5), batch_size=8,
                         save_every=0.0, mesh="data=8", output=output)
print("done", process, jax.process_index())
"""


@pytest.mark.slow
def test_two_processes_give_the_single_process_report(tiny, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tiny), str(tmp_path / "run")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  assert "done 0 0" in outputs[0][0] and "done 1 1" in outputs[1][0]
  merged = json.loads((tmp_path / "run" / "report.json").read_text())
  assert merged["run"]["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  assert_same_numbers(merged, evaluate(tiny))


def test_a_distill_step_gives_the_same_loss_on_every_mesh(tmp_path):
  from tailjax import distill

  root = tmp_path
  write_tiny_gguf(root / "teacher.gguf", Decoder(TINY, rngs=nnx.Rngs(4)))
  text = letter_text(" ".join(topics[k] for k in sorted(topics)[:12]))
  (root / "corpus.jsonl").write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n"
                                             for i in range(0, len(text), 2000)))
  base = distill.DistillConfig(data=str(root / "corpus.jsonl"), teacher=str(root / "teacher.gguf"),
                               student={"hidden_size": 32, "intermediate_size": 48, "num_layers": 1, "num_heads": 4,
                                        "num_kv_heads": 2}, objective="topk", topk=5, seq_len=16, batch_size=8,
                               steps=2, save_every=2, eval_every=2, log_every=1, warmup_steps=1, val_windows=12)
  runs = {layout: distill.distill(distill.DistillConfig(**{**base.to_dict(), "mesh": layout}), root / str(layout))
          for layout in (None, "data=8", "data=2,model=4")}
  for layout, result in runs.items():
    for step in (1, 2):
      assert result.losses[step] == pytest.approx(runs[None].losses[step], rel=1e-5), layout
    assert result.evals[2]["ce"]["sketch"]["counts"] == runs[None].evals[2]["ce"]["sketch"]["counts"]
    assert result.evals[2]["ce"]["mean"] == pytest.approx(runs[None].evals[2]["ce"]["mean"], rel=1e-5)
