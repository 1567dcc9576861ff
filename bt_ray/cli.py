"""bt-ray's command line: parse, build the config, set up logging, call the driver.

    bt-ray run CONFIG [dotted.key=value ...] [--resume]
    bt-ray sweep SWEEP_FILE [dotted.key=value ...] [--dry-run]   a grid of runs; rerun = resume
    bt-ray config [CONFIG] [dotted.key=value ...]     print the resolved config
    bt-ray config --reference                         every key, its default and meaning
    bt-ray data download gsm8k|hotpotqa|wiki-abstracts [--to DIR]   fetch and verify the official files

Exit codes: 0 ok, 1 the run failed, 2 bad configuration or input.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from bt_ray.config import TaskConfig, describe, load_config, to_dict
from bt_ray.errors import BtRayError, ConfigError

logger = logging.getLogger("bt_ray")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bt-ray", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a strategy on a task and print the per-step score table")
    run.add_argument("config", help="YAML file, e.g. configs/iris.yaml")
    run.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. strategy='p -> w' train.epochs=2")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last finished phase")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sweep = sub.add_parser("sweep", help="run a grid of tasks x models x strategies x seeds (rerun to resume)")
    sweep.add_argument("sweep_file", help="YAML sweep file, e.g. configs/sweep_cpu.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=value for every cell; output_dir= and "
                       "max_concurrent= set the sweep's own")
    sweep.add_argument("--dry-run", action="store_true", help="print the cells, the sharing plan and the "
                       "resources each needs; start nothing")
    sweep.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    show = sub.add_parser("config", help="print the resolved config, or the reference of all keys")
    show.add_argument("config", nargs="?", help="YAML file (optional)")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--reference", action="store_true", help="list every key with its default and meaning")
    show.add_argument("--markdown", action="store_true", help="with --reference: as a markdown table")
    data = sub.add_parser("data", help="download the official GSM8K / HotPotQA / wiki abstracts files")
    data_sub = data.add_subparsers(dest="action", required=True)
    fetch = data_sub.add_parser("download", help="fetch, verify row counts, store where the tasks find them")
    fetch.add_argument("dataset", choices=["gsm8k", "hotpotqa", "wiki-abstracts"])
    fetch.add_argument("--to", default=TaskConfig().data_dir, help="data directory (task.data_dir), default "
                       "%(default)s")
    report = sub.add_parser("report", help="Table-1 markdown, CSV, plots and costs of a run or sweep directory")
    report.add_argument("dir", help="a `bt-ray run` directory (output_dir/name) or a `bt-ray sweep` directory")
    report.add_argument("--paper", help="the paper's numbers and model labels (default: configs/paper_table1.yaml)")
    report.add_argument("--out", help="where to write table1.md, the CSVs and PNGs (default: DIR/report)")
    report.add_argument("--estimate", metavar="SWEEP_YAML", help="also estimate what this sweep file's grid costs "
                        "from the phases measured in DIR, e.g. configs/paper_table1.yaml")
    report.add_argument("--gpu-rates", nargs="+", metavar="BENCH_JSON", help="with --estimate: also price the "
                        "measured tokens at the GPU benchmarks' rates (the --json of bench/gpu_serving.py and "
                        "bench/gpu_train.py), e.g. bench/results/h200-2026-11-27-run4-serving.json")
    # key=value after a flag (`bt-ray run configs/iris.yaml --resume name=x`) is an override too.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "dspy", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # One warning per truncated answer drowns the log; truncations are counted per step in results.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    try:
        if args.command == "config":
            return _config(args)
        if args.command == "data":
            return _data(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        return _run(args)
    except ConfigError as exc:
        print(f"bt-ray: {exc}", file=sys.stderr)
        return 2
    except BtRayError as exc:
        logger.error("run failed: %s", exc)
        return 1


def _run(args: argparse.Namespace) -> int:
    from bt_ray.driver import Driver

    config = load_config(args.config, args.overrides)
    results = Driver(config, resume=args.resume).run()
    from bt_ray.report import markdown

    print()
    print(markdown(results))
    print(f"results: {config.run_dir}/results.json, results.md, scores.png")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from bt_ray.scheduler import SweepRun
    from bt_ray.sweep import load_sweep, plan_text

    sweep = load_sweep(args.sweep_file, args.overrides)
    if args.dry_run:
        print(plan_text(sweep))
        return 0
    run = SweepRun(sweep)
    code = run.run()
    summary = run.summary()
    (sweep.dir / "summary.md").write_text(summary)
    print()
    print(summary)
    print(f"sweep: {sweep.dir}/sweep.json, summary.md; each cell's results in {sweep.dir}/cells/<cell>/")
    return code


def _report(args: argparse.Namespace) -> int:
    from bt_ray.estimate import estimate, load_grid
    from bt_ray.gpu_rates import load_rates
    from bt_ray.table1 import make_report

    if args.gpu_rates and not args.estimate:
        raise ConfigError("--gpu-rates prices a grid's phases: give the grid too, e.g. --estimate "
                          "configs/paper_table1.yaml --gpu-rates BENCH.json")
    grid = load_grid(args.estimate) if args.estimate else None
    rates = load_rates(args.gpu_rates) if args.gpu_rates else None
    report = make_report(args.dir, args.paper, args.out, extra_models=grid.models if grid else None)
    print(report.markdown)
    if grid:
        text = estimate(grid, report.costs, report.table.runs, rates)
        (report.out / "estimate.md").write_text(text)
        print(text)
    written = ["table1.md", "table1.csv", "steps.csv", "costs.csv", "scores.png", "phases.png"]
    print(f"report: {', '.join(written + (['estimate.md'] if grid else []))} in {report.out}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from bt_ray.tasks.sources import DATASETS, download

    paths = download(args.dataset, args.to)
    print(f"{args.dataset} ({DATASETS[args.dataset].licence}) verified in {paths[0].parent}:")
    for path in paths:
        print(f"  {path}")
    if args.to != TaskConfig().data_dir:
        print(f"use it with task.data_dir={args.to}")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_markdown() if args.markdown else
              "\n".join(f"{key:34} {default:24} {meaning}" for key, default, meaning in describe()))
        return 0
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), end="")
    return 0


def reference_markdown() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {meaning.replace('|', '/')} |" for key, default, meaning in describe()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
