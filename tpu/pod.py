#!/usr/bin/env python3
"""Create a Cloud TPU VM slice, install tailjax on every worker, run a command on all of them, fetch results.

Every step is a gcloud command; ``--dry-run`` prints them instead of running them.

  python tpu/pod.py create  --name tj --zone us-central2-b --accelerator v4-32
  python tpu/pod.py install --name tj --zone us-central2-b [--bucket my-bucket]
  python tpu/pod.py run     --name tj --zone us-central2-b -- tailjax eval --reference /mnt/runs/qwen \\
                            --candidate @int4 --corpus /mnt/runs/wiki.test.raw --mesh auto --output /mnt/runs/eval
  python tpu/pod.py fetch   --name tj --zone us-central2-b --remote /mnt/runs/eval --local runs/eval
  python tpu/pod.py delete  --name tj --zone us-central2-b

``run`` starts the same command on every worker with ``TAILJAX_MULTIHOST=1``, so
``tailjax.mesh.initialize`` joins them (``jax.distributed.initialize()`` finds a TPU slice's
workers by itself); process 0 writes the report. With ``--bucket``, ``install`` mounts a
Cloud Storage bucket at ``/mnt/runs`` on every worker (gcsfuse): one directory every host sees,
which distillation checkpoints (written by all processes) and resumed runs need.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
MOUNT = "/mnt/runs"


def _vm(args, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", *rest, f"--zone={args.zone}"] + (
      [f"--project={args.project}"] if args.project else [])


def _ssh(args, command: str) -> list[str]:
  return [*_vm(args, "ssh", args.name), "--worker=all", f"--command={command}"]


def commands(args) -> list[list[str]]:
  """The gcloud command lines of one step."""
  if args.step == "create":
    family = args.accelerator.rsplit("-", 1)[0]
    version = args.version or DEFAULT_VERSIONS.get(family)
    if version is None:
      raise SystemExit(f"no default software version for {args.accelerator}; pass --version")
    return [[*_vm(args, "create", args.name), f"--accelerator-type={args.accelerator}", f"--version={version}"]
            + (["--spot"] if args.spot else [])]
  if args.step == "install":
    archive = "tailjax.tar.gz"
    setup = (f"rm -rf tailjax && mkdir tailjax && tar -xzf {archive} -C tailjax && cd tailjax && "
             "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'")
    steps = [["tar", "-czf", f"/tmp/{archive}", "-C", str(ROOT), "--exclude=.git", "--exclude=.venv",
              "--exclude=runs", "."],
             [*_vm(args, "scp", f"/tmp/{archive}", f"{args.name}:~/{archive}"), "--worker=all"],
             _ssh(args, setup)]
    if args.bucket:
      steps.append(_ssh(args, f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT} && "
                              f"gcsfuse --implicit-dirs {shlex.quote(args.bucket)} {MOUNT}"))
    return steps
  if args.step == "run":
    if not args.command:
      raise SystemExit("run needs a command after --, e.g. -- tailjax eval ... --mesh auto")
    command = " ".join(shlex.quote(part) for part in args.command)
    return [_ssh(args, f"cd tailjax && . .venv/bin/activate && TAILJAX_MULTIHOST=1 {command}")]
  if args.step == "fetch":
    return [[*_vm(args, "scp", f"{args.name}:{args.remote}", args.local), "--recurse", "--worker=0"]]
  if args.step == "delete":
    return [[*_vm(args, "delete", args.name), "--quiet"]]
  raise SystemExit(f"unknown step {args.step}")


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("step", choices=("create", "install", "run", "fetch", "delete"))
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project")
  parser.add_argument("--accelerator", default="v4-32", help="create: accelerator type (v4-32, v5litepod-16, ...)")
  parser.add_argument("--version", help="create: TPU software version (default by accelerator family)")
  parser.add_argument("--spot", action="store_true", help="create: a preemptible (spot) slice")
  parser.add_argument("--bucket", help=f"install: Cloud Storage bucket mounted at {MOUNT} on every worker")
  parser.add_argument("--remote", help="fetch: directory on worker 0")
  parser.add_argument("--local", default="runs", help="fetch: local destination")
  parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]  # run: everything after --
  if args.step == "fetch" and not args.remote:
    parser.error("fetch needs --remote")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  for line in commands(args):
    print(shlex.join(line), flush=True)
    if not args.dry_run:
      done = subprocess.run(line)
      if done.returncode:
        return done.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
