"""Runs a sweep's cells on one Ray cluster: as many at once as its CPUs and GPUs fit, the rest queued.

Each cell is a `python -m bt_ray.cli run <cell.yaml> [--resume]` subprocess joined to the sweep's Ray
cluster (RAY_ADDRESS, or a local one the sweep starts), with its own replicas and trainer sized by
its config; its output goes to cells/<cell>/log.txt. A cell whose strategy extends another's waits
for it and starts from its finished steps (sweep.seed_from_parent). A failed cell is recorded with
its cause and log tail, its dependants are blocked, the others go on; the exit code says if any failed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import bt_ray
from bt_ray.errors import ConfigError, plain
from bt_ray.inference import placement
from bt_ray.strategy import format_strategy
from bt_ray.sweep import Cell, Sweep, decide, reused_steps, seed_from_parent, status_rows, write_cell_config

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
POLL_S = 1.0


@dataclass
class CellStatus:
    """One cell's row in sweep.json."""

    name: str
    task: str
    model: str
    strategy: str
    seed: int
    run_dir: str
    parent: str | None
    need: dict[str, float]
    status: str = "pending"  # pending | running | done | failed | blocked | interrupted
    note: str = ""  # finished earlier / resumed / started from <parent> / ...
    reused: list[dict[str, Any]] = field(default_factory=list)  # [{step, strategy, from}]
    dev: list[float | None] = field(default_factory=list)  # dev score of every step
    test: float | None = None
    wall_s: float | None = None
    error: str | None = None
    log_tail: list[str] | None = None


class SweepRun:
    def __init__(self, sweep: Sweep, echo: Callable[[str], None] = print):
        self.sweep, self.echo = sweep, echo
        self.rows = {c.name: CellStatus(c.name, c.task, c.model, format_strategy(c.strategy), c.seed,
                                        str(c.run_dir), c.parent, c.need) for c in sweep.cells}
        self.earlier = status_rows(sweep.dir / "sweep.json")  # what a previous run of this sweep recorded
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.finished = 0
        self.started = time.time()

    # ------------------------------------------------------------ the loop

    def run(self, address: str | None = None) -> int:
        """Run every unfinished cell; 0 when all are done, 1 when any failed or was blocked."""
        self.sweep.dir.mkdir(parents=True, exist_ok=True)
        for cell in self.sweep.cells:
            decision = decide(cell)
            if decision.action == "done":
                self._load_results(cell, "finished earlier")
                self.rows[cell.name].wall_s = self.earlier.get(cell.name, {}).get("wall_s")
                self._progress(cell)
            elif decision.action == "conflict":
                self._fail(cell, decision.detail)
        self._save()
        owns_ray = placement.connect(address)
        try:
            import ray

            totals = placement.cluster_totals()
            gcs = ray.get_runtime_context().gcs_address
            self._refuse_oversized(totals)
            self.echo(f"sweep {self.sweep.name}: {len(self.sweep.cells)} cells on a Ray cluster with "
                      f"{totals['CPU']:g} CPUs, {totals['GPU']:g} GPUs -> {self.sweep.dir}")
            self._loop(totals, gcs)
        except KeyboardInterrupt:
            self._interrupt()
            raise
        finally:
            self._save()
            if owns_ray:
                import ray

                ray.shutdown()
        return 0 if all(r.status == "done" for r in self.rows.values()) else 1

    def _loop(self, totals: dict[str, float], address: str) -> None:
        while True:
            self._start_ready(totals, address)
            if not self.running:
                break
            time.sleep(POLL_S)
            for name, (proc, started) in list(self.running.items()):
                if proc.poll() is not None:
                    del self.running[name]
                    self._finish(self.sweep.cell(name), proc.returncode, time.time() - started)
        for row in self.rows.values():  # nothing runs and nothing can start: what is left waits on a failure
            if row.status == "pending":
                row.status, row.error = "blocked", f"its prefix cell {row.parent} did not finish"
                self._progress(self.sweep.cell(row.name))

    def _start_ready(self, totals: dict[str, float], address: str) -> None:
        limit = self.sweep.max_concurrent or len(self.sweep.cells)
        for cell in self.sweep.cells:
            row = self.rows[cell.name]
            if row.status != "pending" or len(self.running) >= limit:
                continue
            parent = self.rows[cell.parent] if cell.parent else None
            if parent is not None and parent.status in ("failed", "blocked", "interrupted"):
                row.status, row.error = "blocked", f"its prefix cell {parent.name} {parent.status}"
                self._progress(cell)
                continue
            if parent is not None and parent.status != "done":
                continue
            if not _fits(cell.need, self._free(totals)):
                continue
            self._launch(cell, address)

    def _free(self, totals: dict[str, float]) -> dict[str, float]:
        free = dict(totals)
        for name in self.running:
            for key, value in self.rows[name].need.items():
                free[key] = free.get(key, 0.0) - value
        return free

    def _refuse_oversized(self, totals: dict[str, float]) -> None:
        for cell in self.sweep.cells:
            if self.rows[cell.name].status != "pending":
                continue
            try:
                placement.check_resources(cell.config, totals)
            except ConfigError as exc:
                self._fail(cell, "; ".join(exc.problems))

    # ------------------------------------------------------------ one cell

    def _launch(self, cell: Cell, address: str) -> None:
        row = self.rows[cell.name]
        decision = decide(cell)
        try:
            if decision.action == "seed":
                row.reused = seed_from_parent(cell, self.sweep.cell(cell.parent))
                row.note = f"started from {cell.parent}"
            elif decision.action == "resume":
                row.note = f"resumed ({decision.detail})"
            config_path = write_cell_config(cell)
        except (OSError, ValueError, KeyError) as exc:
            self._fail(cell, f"could not prepare its run dir from {cell.parent}: {type(exc).__name__}: {exc}")
            return
        resume = decision.action in ("seed", "resume")
        command = [sys.executable, "-m", "bt_ray.cli", "run", str(config_path), *(["--resume"] if resume else [])]
        root = str(Path(bt_ray.__file__).resolve().parent.parent)  # the same bt_ray in every cell
        env = {**os.environ, "RAY_ADDRESS": address,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(cell.run_dir / "log.txt", "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        row.status = "running"
        self.running[cell.name] = (proc, time.time())
        logger.info("cell %s started (%s%s), pid %d", cell.name, decision.action,
                    f": {decision.detail}" if decision.detail else "", proc.pid)
        self._save()

    def _finish(self, cell: Cell, returncode: int, wall_s: float) -> None:
        row = self.rows[cell.name]
        row.wall_s = round(wall_s, 1)
        if returncode == 0 and (cell.run_dir / "results.json").exists():
            self._load_results(cell, row.note)
            row.wall_s = round(wall_s, 1)
        else:
            since = time.time() - wall_s
            self._fail(cell, _cause(cell.run_dir, returncode, since), _tail(cell.run_dir / "log.txt"))
            return
        self._progress(cell)
        self._save()

    def _load_results(self, cell: Cell, note: str) -> None:
        row = self.rows[cell.name]
        results = json.loads((cell.run_dir / "results.json").read_text())
        row.status, row.note, row.error, row.log_tail = "done", note, None, None
        row.dev = [s["dev"] for s in results["steps"]]
        row.test = (results.get("test") or {}).get("score")
        row.reused = reused_steps(cell)

    def _fail(self, cell: Cell, error: str, log_tail: list[str] | None = None) -> None:
        row = self.rows[cell.name]
        row.status, row.error, row.log_tail = "failed", error, log_tail
        self._progress(cell)
        self._save()

    def _interrupt(self) -> None:
        for name, (proc, _) in self.running.items():
            proc.terminate()
        for name, (proc, started) in self.running.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            row = self.rows[name]
            row.status, row.wall_s = "interrupted", round(time.time() - started, 1)
            row.error = "the sweep was interrupted; rerun it to resume this cell from its last finished step"
        self.running = {}

    # ------------------------------------------------------------ output

    def _progress(self, cell: Cell) -> None:
        self.finished += 1
        row = self.rows[cell.name]
        parts = [f"[{self.finished}/{len(self.rows)}]", f"{row.status:8}", cell.name]
        if row.test is not None:
            parts.append(f"test {row.test:.1f}%")
        if row.wall_s is not None:
            parts.append(f"{row.wall_s:.0f}s")
        if row.reused:
            parts.append(f"reused {_reused_text(row.reused)}")
        if row.note:
            parts.append(f"({row.note})")
        if row.error:
            parts.append(f"-- {row.error}")
        self.echo("  ".join(parts))

    def _save(self) -> None:
        data = {"name": self.sweep.name, "sweep_file": str(self.sweep.path), "started": self.started,
                "wall_s": round(time.time() - self.started, 1), "cells": [asdict(r) for r in self.rows.values()]}
        tmp = self.sweep.dir / "sweep.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.sweep.dir / "sweep.json")

    def summary(self) -> str:
        rows = list(self.rows.values())
        lines = [f"# sweep {self.sweep.name}", "",
                 "| cell | status | dev % per step (* reused) | test % | wall s | note |",
                 "|---|---|---|---:|---:|---|"]
        for row in rows:
            reused = {r["step"] for r in row.reused}
            dev = " → ".join(("—" if d is None else f"{d:.1f}") + ("*" if i in reused else "")
                             for i, d in enumerate(row.dev))
            test = "" if row.test is None else f"{row.test:.1f}"
            wall = "" if row.wall_s is None else f"{row.wall_s:.0f}"
            note = row.error if row.error else row.note
            lines.append(f"| {row.name} | {row.status} | {dev} | {test} | {wall} | {note.replace('|', '/')} |")
        counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
        reused = sum(len(r.reused) for r in rows)
        computed = sum(len(r.dev) for r in rows if r.status == "done") - sum(len(r.reused) for r in rows
                                                                           if r.status == "done")
        lines += ["", f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
                  f"; {computed} steps computed, {reused} reused from prefix cells; sweep wall time "
                  f"{time.time() - self.started:.0f}s"]
        return "\n".join(lines) + "\n"


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(value <= free.get(key, 0.0) + 1e-9 for key, value in need.items() if value > 0)


def _reused_text(reused: list[dict[str, Any]]) -> str:
    steps = [r["step"] for r in reused]
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    return f"{span} from {reused[-1]['from']}"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The log's last lines, without the colour codes Ray puts on its actors' lines."""
    if not path.exists():
        return []
    return [plain(line) for line in path.read_text(errors="replace").splitlines()[-lines:]]


def _cause(run_dir: Path, returncode: int, since: float) -> str:
    """Why a cell's run failed: its last `failed` event since `since`, else the last error line of its log."""
    events = run_dir / "events.jsonl"
    if events.exists():
        records = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
        failed = [r for r in records if r.get("event") == "failed" and r.get("time", 0) >= since]
        if failed:
            last = failed[-1]
            return f"step {last.get('step')} ({last.get('strategy')}) failed: {last.get('error')}"
    kind = "bad configuration" if returncode == 2 else f"exit code {returncode}"
    for line in reversed(_tail(run_dir / "log.txt", 200)):
        if "Error" in line or "failed" in line or line.startswith("bt-ray:") or line.strip().startswith("- "):
            return f"{kind}: {line.strip()}"
    return kind
