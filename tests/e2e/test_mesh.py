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

from tailjax import data, mesh, models
from tailjax import eval as evaluation
from tailjax.eval import EvalConfig
from tailjax.eval.state import load_state
from tailjax.models import Decoder
from helpers import TINY, letter_text, random_hf_model, tokenizer_files, write_tiny_gguf, write_tiny_model_and_corpus

PROTOCOL = data.Protocol("test", seq_len=24, num_sequences=16, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_model_and_corpus(tmp_path_factory.mktemp("mesh"), seed=3, documents=8)


def evaluate(tiny, device_mesh=None, output=None):
  return evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int3-g16", "@int2-g16-asym"],
                                   str(tiny / "corpus.txt"), protocol=PROTOCOL, batch_size=8, save_every=0.0,
                                   mesh=device_mesh), output)


def same_counts(x: dict, y: dict, exact: bool) -> bool:
  """Sketch counts bit for bit, or (``exact`` False: values summed in another order, 1e-5 apart) equal but for a
  few tokens that crossed into a neighbouring bucket."""
  if exact:
    return x == y
  slots = sorted({*x, *y}, key=int)
  moved = {int(k): x.get(k, 0) - y.get(k, 0) for k in slots if x.get(k, 0) != y.get(k, 0)}
  neighbours = all(any(abs(k - j) == 1 for j in moved) for k in moved)
  return sum(moved.values()) == 0 and sum(map(abs, moved.values())) <= 4 and neighbours


def assert_same_numbers(a, b, rtol=1e-6):
  """Sketch counts bit for bit (with ``rtol`` above 1e-6: but for a few tokens at a bucket edge), means and
  per-window PPL to ``rtol``."""
  for label in a["candidates"]:
    x, y = a["candidates"][label]["kld"], b["candidates"][label]["kld"]
    assert same_counts(x["sketch"]["counts"], y["sketch"]["counts"], rtol <= 1e-6) and x["n"] == y["n"] > 0
    assert x["mean"] == pytest.approx(y["mean"], rel=rtol)
  for label in a["models"]:
    x, y = a["models"][label], b["models"][label]
    assert same_counts(x["ce"]["sketch"]["counts"], y["ce"]["sketch"]["counts"], rtol <= 1e-6)
    assert x["ce"]["mean"] == pytest.approx(y["ce"]["mean"], rel=rtol)
    np.testing.assert_allclose(x["sequences"]["ppl"], y["sequences"]["ppl"], rtol=rtol)


def test_parse_meshes():
  assert dict(mesh.parse("data=4,model=2").shape) == {"data": 4, "fsdp": 1, "expert": 1, "model": 2}
  assert dict(mesh.parse("auto").shape) == {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
  assert dict(mesh.parse("model=2,data=-1").shape) == {"data": 4, "fsdp": 1, "expert": 1, "model": 2}
  assert dict(mesh.parse("expert=4,data=2").shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  with pytest.raises(ValueError, match=r"needs 6 devices, 8 are available"):
    mesh.parse("data=3,model=2")
  with pytest.raises(ValueError, match="expected comma-separated AXIS=SIZE"):
    mesh.parse("batch=8")


def test_parameters_follow_their_logical_axes():
  model = Decoder(TINY, rngs=nnx.Rngs(0))
  mesh.shard_model(model, mesh.parse("fsdp=2,model=4"))
  spec = lambda variable: variable[...].sharding.spec
  block = model.layers[0].blocks[0]  # parameters [layers, ...]: every device keeps all layers of its shard
  assert spec(block.attn.q.kernel) == jax.sharding.PartitionSpec(None, "fsdp", "model")  # embed, heads
  assert spec(block.mlp.down.kernel) == jax.sharding.PartitionSpec(None, "model", "fsdp")  # mlp, embed
  assert spec(model.embed.embedding) == jax.sharding.PartitionSpec("model", "fsdp")  # vocab, embed
  assert spec(model.norm.scale) == jax.sharding.PartitionSpec(None)
  odd = Decoder(TINY, rngs=nnx.Rngs(0))
  mesh.shard_model(odd, mesh.parse("model=8"))  # kv_heads x head_dim = 16 splits 8 ways; 48 (mlp) does too
  assert spec(odd.layers[0].blocks[0].attn.k.kernel) == jax.sharding.PartitionSpec(None, None, "model")


@pytest.mark.parametrize("layout", ["fsdp=8", "fsdp=4,model=2"])
def test_loading_creates_each_parameter_in_its_shards(tiny, tmp_path, layout):
  """Every parameter is born on the mesh: its sharding is the rules', each device holds only its own box,
  and the boxes assemble to the one-device load (a GGUF dequantized row range by row range, then
  rounded shard by shard; and a tailjax checkpoint restored by orbax into the same shardings)."""
  device_mesh = mesh.parse(layout)
  spec = f"{tiny / 'tiny.gguf'}@int3-g16"
  whole = nnx.state(models.load(spec).model, nnx.Param)
  placed_model = models.load(spec, device_mesh=device_mesh)
  saved = models.save_checkpoint(placed_model, tmp_path / "saved")
  for placed in (placed_model, models.load(saved, device_mesh=device_mesh)):
    state = nnx.state(placed.model, nnx.Param)
    rules = mesh.parameter_shardings(state, device_mesh)
    split = 0
    for array, expected, reference in zip(jax.tree.leaves(state), jax.tree.leaves(rules), jax.tree.leaves(whole)):
      assert array.sharding.is_equivalent_to(expected, array.ndim)
      shard = expected.shard_shape(array.shape)
      assert len(array.addressable_shards) == 8 and {s.data.shape for s in array.addressable_shards} == {shard}
      split += shard != array.shape
      np.testing.assert_array_equal(np.asarray(array), np.asarray(reference))
    assert split >= len(jax.tree.leaves(state)) // 2  # every matrix is split; only norms are whole


def test_the_default_batch_follows_the_data_shards(tiny):
  """``eval --mesh data=8`` without a batch size: 8 windows per step (4 would not split over 8 shards)."""
  default = EvalConfig()
  assert [default.batch_size_on(mesh.parse(m)) for m in ("data=8", "data=2,model=4")] == [8, 4]
  assert default.batch_size_on(mesh.parse("data=3,model=2", jax.devices()[:6])) == 6
  assert default.batch_size_on(None) == 4 and EvalConfig(batch_size=3).batch_size_on(mesh.parse("data=8")) == 3
  result = evaluation.run(EvalConfig(str(tiny / "tiny.gguf"), ["@int3-g16"], str(tiny / "corpus.txt"),
                                     protocol=PROTOCOL, save_every=0.0, mesh="data=8"))
  assert result["run"]["batch_size"] == 8 and result["run"]["windows_done"] == PROTOCOL.num_sequences


@pytest.mark.parametrize("layout", ["data=8", "data=4,model=2", "fsdp=4,model=2", "fsdp=8", "data=2,fsdp=2,model=2"])
def test_eval_gives_the_same_numbers_on_every_mesh(tiny, layout):
  assert_same_numbers(evaluate(tiny, layout), evaluate(tiny))


WORKER = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from tailjax import mesh
from tailjax import data, eval as evaluation
process, port, root, output = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
mesh.initialize(f"127.0.0.1:{port}", 2, process)
assert jax.device_count() == 8 and jax.local_device_count() == 4
result = evaluation.run(evaluation.EvalConfig(
    f"{root}/tiny.gguf", ["@int3-g16", "@int2-g16-asym"], f"{root}/corpus.txt",
    protocol=data.Protocol("test", seq_len=24, num_sequences=16, seed=5), batch_size=8, save_every=0.0,
    mesh="data=8"), output)
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
  assert merged["run"]["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
  assert_same_numbers(merged, evaluate(tiny))


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
  """A Qwen3-MoE directory (8 experts, top 2, a dense layer between two sparse ones) with a real tokenizer."""
  import transformers

  root = tmp_path_factory.mktemp("moe")
  random_hf_model(transformers.Qwen3MoeConfig, root / "model", vocab_size=300, hidden_size=64, intermediate_size=80,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True)
  tokenizer_files(root / "model", 300)
  (root / "corpus.txt").write_text(" ".join(topics[k] for k in sorted(topics)[:6]))
  return root


def test_experts_split_over_the_expert_axis_with_the_same_numbers(tiny_moe):
  from tailjax import models

  loaded = models.load(tiny_moe / "model")
  mesh.shard_model(loaded.model, mesh.parse("expert=4,data=2"))
  gate = loaded.model.layers[0].blocks[0].mlp.gate[...]  # [layers, experts, d, mlp]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, None)
  assert {s.data.shape[1:] for s in gate.addressable_shards} == {(2, 64, 32)}  # 8 experts / 4

  run = lambda layout: evaluation.run(EvalConfig(str(tiny_moe / "model"), ["@int4-g16"],
                                                 str(tiny_moe / "corpus.txt"), protocol=PROTOCOL, batch_size=8,
                                                 save_every=0.0, mesh=layout))
  single = run(None)
  for layout in ("expert=4,data=2", "expert=2,model=2,fsdp=2"):  # float32 sums in another order: 1e-5
    assert_same_numbers(run(layout), single, rtol=1e-5)


def test_routing_equals_transformers_router_and_is_reported(tiny_moe, rng, tmp_path):
  import torch
  import transformers

  from tailjax import models

  ids = rng.integers(0, 300, (2, 20))
  ours = models.load(tiny_moe / "model").model.forward(ids).experts
  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe / "model").eval()
  with torch.no_grad():
    router_logits = hf(torch.as_tensor(ids), output_router_logits=True).router_logits
  assert len(ours) == len(router_logits) == 2  # layers 0 and 2; layer 1 is dense
  for mine, logits in zip(ours, router_logits):
    theirs = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices.numpy().reshape(2, 20, 2)
    np.testing.assert_array_equal(np.sort(np.asarray(mine), -1), np.sort(theirs, -1))

  report = evaluation.run(EvalConfig(str(tiny_moe / "model"), [str(tiny_moe / "model"), "@int2-g16"],
                                     str(tiny_moe / "corpus.txt"), protocol=PROTOCOL, batch_size=8, save_every=0.0),
                          tmp_path / "run")
  scored = report["run"]["scored_tokens"]
  for label, r in report["routing"].items():
    assert r["layers"] == [0, 2] and r["experts"] == 8
    np.testing.assert_allclose(np.sum(r["share"], axis=1), 1.0)
  itself, int2 = (report["routing"][label] for label in list(report["candidates"]))
  assert itself["overlap_with_reference"] == [1.0, 1.0]  # the same model routes every token the same way
  assert 0.3 < int2["mean_overlap"] < 1.0
  assert scored > 0 and "routing" not in report["models"]
  # the saved state (what a resumed run starts from) keeps the routing sums
  saved = load_state(tmp_path / "run" / "state.npz").routing
  expected = [f"{kind}/{label}" for label in report["routing"] for kind in ("layers", "load")]
  assert sorted(saved) == sorted(expected + [f"overlap/{label}" for label in report["candidates"]])
  assert saved[f"load/{list(report['candidates'])[1]}"].sum() == 2 * 2 * scored  # k=2, two MoE layers
