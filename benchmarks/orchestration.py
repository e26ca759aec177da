"""Overhead of the rdn-full-pipeline Prefect flow per stage when every stage is cached.

    python benchmarks/orchestration.py                  # builds a tiny temporary copy first (~1-2 min)
    python benchmarks/orchestration.py --project DIR    # an already reproduced checkout

For each stage the flow runs ``dvc repro -s <stage>`` (DVC answers "didn't change,
skipping"). Printed per stage:
  * flow      -- flow wall time / stages (what a user waits per cached stage),
  * dvc       -- the same ``dvc repro -s`` run directly, without Prefect (median of runs),
  * overhead  -- (flow wall - sum of direct dvc times) / stages: Prefect task runs, logging,
                 the MLflow parent run, the lock, the summary artifact.
The temporary Prefect API starts on the first flow call in this process; that start is
reported separately (it is paid once per `make run`, not per stage). Goal: <= 3 s per stage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from rdn.config import read_params_file  # noqa: E402 -- after the sys.path entry
from rdn.io import copy_checkout  # noqa: E402


def tiny_copy(dest: Path) -> Path:
    """A git copy of this checkout (tracked + unignored files, no outputs) with tiny params."""
    copy_checkout(REPO, dest, skip=("artifacts/", "metrics/", "reports/"))
    params = read_params_file(dest / "configs/smoke.yaml")  # every stage, tiny
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, GIT_AUTHOR_NAME="rdn-bench", GIT_AUTHOR_EMAIL="bench@rdn.invalid",
               GIT_COMMITTER_NAME="rdn-bench", GIT_COMMITTER_EMAIL="bench@rdn.invalid")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, help="reproduced checkout (default: build a tiny temporary copy)")
    ap.add_argument("--dvc-repeats", type=int, default=3, help="direct `dvc repro -s` timings per stage")
    args = ap.parse_args()

    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    tmp = None
    if args.project:
        root = args.project.resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="rdn-bench-orch-"))
        os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect-home"))
        root = tiny_copy(tmp / "repo")
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # stage output stays out of the table

    from flows.pipeline import pipeline  # after the environment is set

    try:
        t0 = time.monotonic()
        first = pipeline(project=str(root), return_state=True)  # starts the temporary API; builds if needed
        first_s = time.monotonic() - t0
        if not first.is_completed():
            print(f"first run failed: {first.message}", file=sys.stderr)
            return 1
        ran = [r["stage"] for r in first.result()["stages"] if r["status"] == "ran"]

        t0 = time.monotonic()
        state = pipeline(project=str(root), return_state=True)
        flow_s = time.monotonic() - t0
        if not state.is_completed():
            print(f"cached run failed: {state.message}", file=sys.stderr)
            return 1
        results = state.result()["stages"]
        not_cached = [r["stage"] for r in results if r["status"] != "cached"]
        if not_cached:
            print(f"warning: not cached on the measured run: {not_cached}", file=sys.stderr)

        direct: dict[str, float] = {}
        for r in results:
            times = []
            for _ in range(max(1, args.dvc_repeats)):
                t = time.monotonic()
                subprocess.run([str(BIN / "dvc"), "repro", "-s", r["stage"]], cwd=root, check=True,
                               capture_output=True)
                times.append(time.monotonic() - t)
            direct[r["stage"]] = statistics.median(times)

        n = len(results)
        print(f"project {root} ({n} stages; first run {first_s:.1f} s incl. temporary Prefect API start"
              f"{', built ' + ', '.join(ran) if ran else ''})")
        print(f"{'stage':<12}{'in flow s':>10}{'direct dvc s':>14}{'overhead s':>12}")
        for r in results:
            print(f"{r['stage']:<12}{r['seconds']:>10.2f}{direct[r['stage']]:>14.2f}"
                  f"{r['seconds'] - direct[r['stage']]:>12.2f}")
        dvc_total = sum(direct.values())
        per_stage = flow_s / n
        overhead = (flow_s - dvc_total) / n
        print(f"cached flow: {flow_s:.2f} s wall for {n} stages = {per_stage:.2f} s per stage; "
              f"direct dvc {dvc_total / n:.2f} s per stage; flow overhead {overhead:.2f} s per stage "
              f"(goal <= 3 s per stage: {'met' if per_stage <= 3.0 else 'NOT met'})")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
