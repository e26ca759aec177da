"""``rdn compare``, ``rdn sweep`` and ``rdn tracking``: the comparison half of the console script.

Registered on rdn.cli.main's parser by :func:`register`; every heavy import happens inside the
command, so ``rdn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_compare(args: argparse.Namespace) -> int:
    from rdn.tracking.compare import compare_main

    if args.run_ids and args.experiment:
        print("rdn compare: give run ids or --experiment, not both", file=sys.stderr)
        return 2
    return compare_main(args.run_ids, args.experiment, args.uri, fmt=args.format, params=args.params,
                        metrics=args.metric, limit=args.limit)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rdn.pipeline.sweep import sweep_main

    stages = None if args.stages is None else [s for s in args.stages.replace(",", " ").split() if s]
    return sweep_main(args.name, run=args.run, temp=args.temp, params_file=args.params, jobs=args.jobs,
                      suffix=args.suffix, stages=stages, write_params=args.write_params,
                      force=args.force)


def _cmd_tracking_flush(args: argparse.Namespace) -> int:
    from rdn.tracking.compare import default_uri_and_experiment
    from rdn.tracking.client import tracking_home
    from rdn.tracking.replay import flush_pending, pending_files, read_spill

    home = tracking_home(args.project.resolve())
    files = pending_files(home)
    if not files:
        print(f"nothing unsent in {home / 'unsent'}")
        return 0
    if args.dry_run:
        for path in files:
            header, records = read_spill(path)
            n = sum("key" in r for r in records)
            print(f"{path.name}: {n} metric values for run {(header or {}).get('run_id') or '(not created)'} "
                  f"of stage {(header or {}).get('stage')} at {(header or {}).get('uri')}")
        return 0
    uri = args.uri
    if uri is None and args.to_default:
        uri, _ = default_uri_and_experiment(args.project / "params.yaml")
    failed = 0
    for r in flush_pending(home, uri=uri, timeout_s=args.timeout):
        if r.ok:
            extra = f"; {len(r.conflicts)} params already set differently: {', '.join(r.conflicts)}" if r.conflicts else ""
            print(f"sent {r.path.name}: {r.summary()} -> run {r.run_id}{extra}")
        elif r.skipped:
            print(f"skipped {r.path.name}: {r.skipped}")
        else:
            failed += 1
            print(f"FAILED {r.path.name}: {r.error} (kept; try again when the server is up, or --uri)",
                  file=sys.stderr)
    return 1 if failed else 0


def register(sub) -> None:
    c = sub.add_parser("compare", help="table of key metrics (val bpb, task accuracy, tok/s, MFU, peak memory) "
                       "and differing params of MLflow runs")
    c.add_argument("run_ids", nargs="*", help="MLflow run ids (a pipeline/DVC-experiment parent run is "
                   "summarised from its stage children and its own summary of the stages' metrics)")
    c.add_argument("--experiment", "-e", help="newest top-level runs of this MLflow experiment "
                   "(default without run ids: tracking.experiment of params.yaml)")
    c.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, tracking.uri, mlflow/mlflow.db)")
    c.add_argument("--format", "-f", choices=["table", "md", "csv"], default="table")
    c.add_argument("--params", choices=["diff", "all", "none"], default="diff",
                   help="param columns: those differing between runs (default), all, none")
    c.add_argument("--metric", "-m", action="append", default=[],
                   help="extra metric column, KEY or STAGE:KEY (repeatable)")
    c.add_argument("--limit", type=int, default=50, help="with --experiment: at most this many runs")
    c.set_defaults(func=_cmd_compare)

    s = sub.add_parser("sweep", help="validate an experiment set of configs/experiments/ and print "
                       "(--run: queue and start) its `dvc exp run` commands")
    s.add_argument("name", nargs="?", help="experiment set name or YAML path (omit to list the sets)")
    s.add_argument("--run", action="store_true", help="execute the commands instead of printing them")
    s.add_argument("--temp", action="store_true", help="`dvc exp run --temp` (foreground, one after another) "
                   "instead of --queue + `dvc queue start`")
    s.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file the variants modify")
    s.add_argument("--jobs", "-j", type=int, default=1, help="`dvc queue start --jobs` (default 1)")
    s.add_argument("--stages", help="override the set's dvc targets (comma/space separated; '' = whole pipeline)")
    s.add_argument("--force", "-f", action="store_true", help="`dvc exp run -f`: rerun stages DVC would restore "
                   "from its run cache, overwrite experiments of the same name")
    s.add_argument("--suffix", default="", help="appended to each DVC experiment name (to rerun a sweep)")
    s.add_argument("--write-params", type=Path, metavar="DIR", help="write one full params file per variant "
                   "here (for the Prefect flow's params_file parameter) instead of dvc commands")
    s.set_defaults(func=_cmd_sweep)

    t = sub.add_parser("tracking", help="MLflow housekeeping")
    tsub = t.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    f = tsub.add_parser("flush", help="send metrics kept in mlflow/unsent/ while the tracking server was away")
    f.add_argument("--project", type=Path, default=Path.cwd(), help="project directory (default: current)")
    f.add_argument("--uri", help="send to this tracking URI instead of the one each file records")
    f.add_argument("--to-default", action="store_true", help="send to the project's current tracking URI")
    f.add_argument("--dry-run", action="store_true", help="list what is pending, send nothing")
    f.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
    f.set_defaults(func=_cmd_tracking_flush)
