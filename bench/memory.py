"""Resident memory (RSS) of a `seqrl-train` run, sampled every RL step: does memory grow over a long run?

    python bench/memory.py                       # experiment=smoke, 200 RL steps, cheap eval, default loggers
    python bench/memory.py --steps 50 --trace    # shorter run; tracemalloc diff of what grew after the mark step
    python bench/memory.py -- algorithm=gspo     # extra seqrl-train overrides after `--`

The run happens in a fresh subprocess (`python bench/memory.py --child ...`), so the numbers are those of a clean
process: the child appends a Lightning callback (via `configure_callbacks` of an RLModule subclass) that reads VmRSS
from /proc/self/status after every training step, and a background thread samples it every `--interval` s (the
peaks inside a step, warm-up and evaluation included; with psutil also the RSS of child processes such as W&B's
service). At the mark step (20) and at the end of training the callback counts live Python objects by type and live
torch tensors (count, bytes); with --trace it starts tracemalloc at the mark step and reports the allocation sites
whose memory grew by the end. At the end it also calls glibc's malloc_trim(0): RSS that falls back is allocator
fragmentation/caching, not live objects. Reported: RSS at the mark step, at the last step, growth % after the mark
and of the mean RSS of --window steps from the mark to the last --window steps (target < 5 % for both; the
per-step RSS saw-tooths by tens of MB with the allocator), the least-squares slope in MB per 100 steps after the
mark, and the maxima (training steps; whole process). tracemalloc's own traces add RSS: read growth from a run without
--trace. `--keep` keeps the run directory; `--report DIR/rss.json` re-reports it. Writes results/perf/memory.json.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Record  # noqa: E402


def rss_mb(pid: str = "self") -> float:
    """VmRSS of a process in MiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def children_rss_mb() -> float:
    """Total RSS of this process's descendants (e.g. wandb-core) in MiB; 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return total


def live_objects() -> dict:
    """Live Python objects by type (gc-tracked) and live torch tensors (count, MiB of distinct storages)."""
    import warnings

    import torch

    gc.collect()
    objs = gc.get_objects()
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        tensors = [o for o in objs if isinstance(o, torch.Tensor)]
    storages = {}
    for t in tensors:
        try:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # meta / sparse tensors
            pass
    return {"objects": len(objs), "by_type": dict(Counter(type(o).__name__ for o in objs)), "tensors": len(tensors),
            "tensor_mb": sum(storages.values()) / 2**20}


def malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------------- child
def run_child(result_path: str, mark: int, interval: float, trace: bool, overrides: list[str]) -> None:
    """Run seqrl-train in this process with the RSS probe attached; write the samples to `result_path`."""
    import tracemalloc

    import lightning as L

    import seqrl.module
    import seqrl.train

    t0 = time.monotonic()
    out = {"timeline": [], "steps": [], "diag": {}, "overrides": overrides, "trace": trace}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["timeline"].append((round(time.monotonic() - t0, 2), rss_mb(), children_rss_mb()))
            stop.wait(interval)

    class RSSProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = pl_module.rl_step
            out["steps"].append((step, round(time.monotonic() - t0, 2), rss_mb()))
            if step == mark:
                out["diag"]["mark"] = live_objects()
                if trace:
                    tracemalloc.start(8)
                    self.snap = tracemalloc.take_snapshot()

        def on_train_end(self, trainer, pl_module) -> None:
            out["diag"]["end"] = live_objects()
            if trace and tracemalloc.is_tracing() and getattr(self, "snap", None) is not None:
                diff = tracemalloc.take_snapshot().compare_to(self.snap, "traceback")
                out["diag"]["tracemalloc_top"] = [
                    {"kb": round(d.size_diff / 1024, 1), "count": d.count_diff, "where": d.traceback.format()[-4:]}
                    for d in diff[:12]]
                tracemalloc.stop()
            before = rss_mb()
            trimmed = malloc_trim()
            out["diag"]["malloc_trim"] = {"ok": trimmed, "rss_before_mb": before, "rss_after_mb": rss_mb()}

    class ProbedRLModule(seqrl.module.RLModule):
        def configure_callbacks(self):
            return [RSSProbe()]

    seqrl.module.RLModule = ProbedRLModule  # seqrl.train imports RLModule at call time
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sys.argv = ["seqrl-train", *overrides]
    try:
        seqrl.train.main()
    except SystemExit as exc:  # Hydra exits after the task; keep the samples
        out["exit"] = exc.code
    finally:
        stop.set()
        sampler.join()
        Path(result_path).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------------ parent
def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MiB) against step, per 100 steps."""
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(s for s, _ in points) / n, sum(r for _, r in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    return 100 * sum((s - mx) * (r - my) for s, r in points) / sxx if sxx else 0.0


def grown_types(diag: dict, top: int = 10) -> list[tuple[str, int]]:
    """Python object types whose live count grew most from the mark step to the end."""
    a, b = diag["mark"]["by_type"], diag["end"]["by_type"]
    growth = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}
    return sorted(((k, v) for k, v in growth.items() if v > 0), key=lambda kv: -kv[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="RL steps (trainer.max_steps); the target is 200")
    ap.add_argument("--mark", type=int, default=20, help="baseline step for the growth %%")
    ap.add_argument("--interval", type=float, default=0.5, help="background RSS sampling interval (s)")
    ap.add_argument("--eval-limit", type=int, default=16, help="eval.limit: items of the cheap held-out eval")
    ap.add_argument("--threads", type=int, default=0, help="seqrl-train threads= (0 = torch's default)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc diff from the mark step to the end")
    ap.add_argument("--window", type=int, default=10, help="steps averaged at the mark and at the end")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (printed)")
    ap.add_argument("--report", metavar="RSS_JSON", help="only re-report a kept run's rss.json (no new run)")
    ap.add_argument("--child", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra seqrl-train overrides (after --)")
    args = ap.parse_args()
    if args.child:
        return run_child(args.child, args.mark, args.interval, args.trace, args.overrides)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        return report(data, args, data["overrides"], None, Path(args.report).parent)
    if args.steps <= args.mark:
        raise ValueError(f"--steps={args.steps}: must be > --mark={args.mark}")

    run_dir = Path(tempfile.mkdtemp(prefix="seqrl-memory-"))
    overrides = ["experiment=smoke", f"trainer.max_steps={args.steps}", f"eval.limit={args.eval_limit}",
                 f"hydra.run.dir={run_dir}", *([f"threads={args.threads}"] if args.threads else []), *args.overrides]
    result = run_dir / "rss.json"
    cmd = [sys.executable, __file__, "--child", str(result), "--mark", str(args.mark), "--interval",
           str(args.interval), *(["--trace"] if args.trace else []), "--", *overrides]
    print("child:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(run_dir / "child.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode or not result.exists():
        tail = (run_dir / "child.log").read_text()[-3000:]
        raise SystemExit(f"child failed (exit {proc.returncode}); log tail:\n{tail}")
    data = json.loads(result.read_text())
    report(data, args, overrides, time.time() - t0, run_dir)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)


def report(data: dict, args, overrides: list[str], seconds: float, run_dir: Path) -> None:
    """Print the RSS curve and the diagnosis; write results/perf/memory.json."""
    steps = {s: r for s, _, r in data["steps"]}
    last = max(steps)
    if args.mark not in steps:
        raise SystemExit(f"the run stopped before the mark step {args.mark} (last step {last})")
    at_mark, at_end = steps[args.mark], steps[last]
    growth = 100 * (at_end - at_mark) / at_mark
    w_mark = [r for s, r in steps.items() if args.mark <= s < args.mark + args.window]
    w_end = [r for s, r in steps.items() if s > last - args.window]
    mean_mark, mean_end = sum(w_mark) / len(w_mark), sum(w_end) / len(w_end)
    growth_w = 100 * (mean_end - mean_mark) / mean_mark  # robust to the step-to-step allocator sawtooth
    after = [(s, r) for s, r in steps.items() if s >= args.mark]
    slope = slope_per_100(after)
    t_first = min(t for _, t, _ in data["steps"])
    t_last = max(t for _, t, _ in data["steps"])
    timeline = data["timeline"]
    max_all = max([r for _, r, _ in timeline] + list(steps.values()))
    max_train = max([r for t, r, _ in timeline if t_first <= t <= t_last] + list(steps.values()))
    max_children = max((c for _, _, c in timeline), default=0.0)
    diag = data["diag"]
    rec = Record("memory", {"steps": last, "mark": args.mark, "window": args.window, "interval_s": args.interval,
                            "overrides": overrides, "trace": data.get("trace", args.trace)})
    every = max(1, last // 10)
    print(f"{'step':>5} {'RSS MiB':>9}")
    for s in sorted(steps):
        if s in (1, args.mark, last) or s % every == 0:
            print(f"{s:>5} {steps[s]:>9.1f}")
            rec.add(part="curve", step=s, rss_mb=round(steps[s], 1))
    summary = {"rss_mark_mb": round(at_mark, 1), "rss_end_mb": round(at_end, 1), "growth_pct": round(growth, 2),
               f"rss_mean_steps_{args.mark}_{args.mark + args.window - 1}_mb": round(mean_mark, 1),
               f"rss_mean_last_{args.window}_steps_mb": round(mean_end, 1), "growth_window_pct": round(growth_w, 2),
               "slope_mb_per_100_steps": round(slope, 2), "max_rss_train_mb": round(max_train, 1),
               "max_rss_process_mb": round(max_all, 1), "max_children_rss_mb": round(max_children, 1),
               "last_step": last, "train_seconds": round(t_last - t_first, 1),
               "wall_seconds": None if seconds is None else round(seconds, 1), "target_pct": 5.0,
               "passes": max(growth, growth_w) < 5.0}
    rec.add(part="summary", **summary)
    print(json.dumps(summary, indent=1))
    if "mark" in diag and "end" in diag:
        m, e = diag["mark"], diag["end"]
        objs = {"objects_mark": m["objects"], "objects_end": e["objects"], "tensors_mark": m["tensors"],
                "tensors_end": e["tensors"], "tensor_mb_mark": round(m["tensor_mb"], 2),
                "tensor_mb_end": round(e["tensor_mb"], 2)}
        rec.add(part="objects", **objs, grown_types=json.dumps(grown_types(diag)))
        print("live objects:", objs, "\ngrown types:", grown_types(diag))
    if "malloc_trim" in diag:
        rec.add(part="malloc_trim", **diag["malloc_trim"])
        print("malloc_trim:", diag["malloc_trim"])
    for item in diag.get("tracemalloc_top", []):
        print(f"  +{item['kb']:>8} KiB {item['count']:>+6}  {' | '.join(x.strip() for x in item['where'])}")
        rec.add(part="tracemalloc", kb=item["kb"], count=item["count"], where=" | ".join(item["where"]))
    rec.note(f"RSS of the training process read from /proc/self/status after each RL step; run dir {run_dir}")
    rec.write()


if __name__ == "__main__":
    main()
