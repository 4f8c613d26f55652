"""tpu/pod.py --dry-run: the gcloud commands a pod launch would run."""

import shlex
import subprocess
import sys
from pathlib import Path

POD = Path(__file__).parents[2] / "tpu" / "pod.py"


def dry(*argv: str) -> list[list[str]]:
  done = subprocess.run([sys.executable, str(POD), argv[0], "--dry-run", *argv[1:]], capture_output=True, text=True,
                        check=True)
  return [shlex.split(line) for line in done.stdout.splitlines()]


def test_create_install_run_fetch_delete():
  common = ("--name", "tj", "--zone", "us-central2-b")
  (create,) = dry("create", *common, "--accelerator", "v5litepod-16", "--spot")
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tj"]
  assert {"--zone=us-central2-b", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
          "--spot"} <= set(create)
  tar, scp, setup, mount = dry("install", *common, "--bucket", "runs-bucket")
  assert tar[0] == "tar" and "--exclude=.git" in tar and scp[4] == "scp" and "--worker=all" in scp
  assert "pip install -q -e . 'jax[tpu]'" in setup[-1] and "gcsfuse --implicit-dirs runs-bucket /mnt/runs" in mount[-1]
  (run,) = dry("run", *common, "--", "tailjax", "eval", "--mesh", "auto", "--output", "/mnt/runs/x y")
  assert "--worker=all" in run
  assert run[-1] == ("--command=cd tailjax && . .venv/bin/activate && TAILJAX_MULTIHOST=1 tailjax eval --mesh auto "
                     "--output '/mnt/runs/x y'")
  (fetch,) = dry("fetch", *common, "--remote", "/mnt/runs/x", "--local", "runs/x")
  assert fetch[4:7] == ["scp", "tj:/mnt/runs/x", "runs/x"] and "--worker=0" in fetch and "--recurse" in fetch
  (delete,) = dry("delete", *common, "--project", "p")
  assert delete[4:6] == ["delete", "tj"] and "--project=p" in delete


def test_missing_pieces_are_named():
  done = subprocess.run([sys.executable, str(POD), "run", "--name", "tj", "--zone", "z", "--dry-run"],
                        capture_output=True, text=True)
  assert done.returncode != 0 and "run needs a command after --" in done.stderr
  done = subprocess.run([sys.executable, str(POD), "create", "--name", "tj", "--zone", "z", "--accelerator", "x9-8",
                         "--dry-run"], capture_output=True, text=True)
  assert done.returncode != 0 and "no default software version for x9-8" in done.stderr
