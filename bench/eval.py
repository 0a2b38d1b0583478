"""Grading and evaluation throughput: MATH-500 answers graded per second by `seqrl.eval.grading`, with its fast paths
on and with every item forced through full math-verify, serially and on a process pool; then the whole harness
(generation + grading + metrics) on a tiny model and on the oracle.

    python bench/eval.py                                  # 5 repeats, 2 workers, grading + end to end
    python bench/eval.py --repeats 9 --skip-e2e --data-dir /path/to/benchmarks

Grading: each of the 500 MATH-500 golds (conf/benchmark/math500.yaml, loaded by seqrl.eval.benchmarks) gets one
model-like response from `seqrl.eval.answer_variants`: an equivalent-but-different rewrite of the gold for half the
items (`\\dfrac`, exact decimals, `x = 5`, `5 \\text{ cm}`, `\\left( \\right)`, reordered lists...), a wrong answer
for the rest, boxed inside a sentence. Repeat r uses `shift=r`, i.e. other responses each time, and grading keeps
no cache across grade_many calls (a gold is parsed once per batch), so nothing computed in one repeat is reused in
the next. One untimed pass (shift -1) per configuration first starts the pool and warms the process (imports, the
LaTeX parser's prediction cache); its rate is reported as `first pass` (the first configuration and the first pool
configuration include start-up). In every repeat the configurations run in rotated order, so other processes' load
hits them alike: grade() in a loop, grade_many serial, grade_many on --workers processes, each with fast paths on
and with `fast_paths=False` (full math-verify for every item that passes the safety pre-filters). All
configurations must return the same verdicts (checked, reported). Also reported: which path decided each item
(`grading.math_path`), how many verdicts match the intent (equivalent -> True), and items per CPU-second (this
process + pool workers, from /proc): on a shared machine the wall-clock rate measures the others' load as much as
the grader (Linux autogroup scheduling gives a session's processes one share, so a pool gains nothing while other
sessions keep the cores busy); the CPU rate does not.

End to end (evaluate.py's loop without writing files or logging): tiny_dense (random init) on the held-out arith
split, and the oracle on MATH-500; items/s over generation + grading + metrics, and generated tokens/s over the
rollout engine's generation time.
"""
from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

from common import ROOT, Record, summary
from omegaconf import OmegaConf

from seqrl.config import BenchmarkConfig
from seqrl.eval import grading
from seqrl.eval.answer_variants import variant_responses
from seqrl.eval.benchmarks import load_benchmark

MODES = {"fast": True, "forced": False}


def math500_golds(data_dir: str) -> list[str]:
    """The 500 gold answers as the harness loads them (local copy, gold_map math500)."""
    own = OmegaConf.load(ROOT / "conf" / "benchmark" / "math500.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), own))
    return [s.answer for s in load_benchmark(cfg, data_dir)]


def cpu_seconds(workers: int) -> float:
    """User + system CPU seconds used so far by this process and, when workers > 1, by the grading pool's workers
    (read from /proc on Linux; elsewhere this process only). Load-independent, unlike the wall clock."""
    pids = list(grading._pool(workers)._processes) if workers > 1 else []  # noqa: SLF001 - the pool's worker pids
    total = time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return total


def grade_with(config: str, texts: list[str], golds: list[str], fast: bool, workers: int) -> list[bool]:
    if config == "grade loop":
        return [grading.grade(t, g, "math", fast_paths=fast) for t, g in zip(texts, golds)]
    return grading.grade_many(texts, golds, "math", workers=workers if config != "grade_many serial" else 0,
                              fast_paths=fast)


def bench_grading(golds: list[str], args, rec: Record) -> None:
    configs = [(c, m) for c in ("grade loop", "grade_many serial", f"grade_many workers={args.workers}")
               for m in MODES]
    warm = variant_responses(golds, shift=-1)
    first = {}
    for config, mode in configs:  # untimed for the statistics: pool start-up, imports, parser caches
        start = time.perf_counter()
        grade_with(config, [t for t, _ in warm], golds, MODES[mode], args.workers)
        first[(config, mode)] = time.perf_counter() - start
    rates, cpu_rates = collections.defaultdict(list), collections.defaultdict(list)
    paths, agree, mismatched = collections.Counter(), collections.Counter(), 0
    for rep in range(args.repeats):
        responses = variant_responses(golds, shift=rep)
        texts = [t for t, _ in responses]
        verdicts = {}
        for k in range(len(configs)):
            config, mode = configs[(k + rep) % len(configs)]
            pool = args.workers if config.startswith("grade_many workers") else 0
            start, cpu = time.perf_counter(), cpu_seconds(pool)
            verdicts[(config, mode)] = grade_with(config, texts, golds, MODES[mode], args.workers)
            rates[(config, mode)].append(len(texts) / (time.perf_counter() - start))
            cpu_rates[(config, mode)].append(len(texts) / max(cpu_seconds(pool) - cpu, 1e-3))
        reference = verdicts[configs[0]]
        mismatched += sum(v != reference for v in verdicts.values())
        agree.update(("equivalent" if meant else "wrong", ok == meant) for ok, (_, meant) in zip(reference, responses))
        paths.update(grading.math_path(grading.extract_answer(t, "math") or "", g) for t, g in zip(texts, golds))
    print(f"grading {len(golds)} MATH-500 items x {args.repeats} repeats (items/s; fast = fast paths on, forced = "
          f"full math-verify)")
    print(f"{'configuration':<22} {'mode':<7} {'min':>8} {'median':>8} {'max':>8} {'first pass':>11} "
          f"{'items per CPU-second (median)':>30}")
    for config, mode in configs:
        s, c = summary(rates[(config, mode)]), summary(cpu_rates[(config, mode)])
        print(f"{config:<22} {mode:<7} {s['min']:>8.0f} {s['median']:>8.0f} {s['max']:>8.0f} "
              f"{len(golds) / first[(config, mode)]:>9.0f}/s {c['median']:>30.0f}")
        rec.add(part="grading", config=config, mode=mode, items_per_s=s, items_per_cpu_s=c,
                first_pass_items_per_s=round(len(golds) / first[(config, mode)], 1))
    pool, serial = f"grade_many workers={args.workers}", "grade_many serial"
    for mode in MODES:
        speedup = summary(rates[(pool, mode)])["median"] / summary(rates[(serial, mode)])["median"]
        print(f"pool/serial speed-up ({mode}): {speedup:.2f}x")
    fast_gain = summary(rates[(pool, "fast")])["median"] / summary(rates[(pool, "forced")])["median"]
    total = args.repeats * len(golds)
    print(f"fast/forced speed-up ({pool}): {fast_gain:.2f}x")
    print("deciding path over all repeats: " + ", ".join(f"{p} {n}" for p, n in paths.most_common()))
    meant = {kind: f"{agree[(kind, True)]}/{agree[(kind, True)] + agree[(kind, False)]}"
             for kind in ("equivalent", "wrong")}
    print(f"verdicts as meant: equivalent {meant['equivalent']}, wrong {meant['wrong']}; configurations that "
          f"disagreed with `grade loop fast`: {mismatched}")
    rec.add(part="grading paths", items=total, **dict(paths))
    rec.add(part="grading verdicts", items=total, equivalent_judged_equal=agree[("equivalent", True)],
            wrong_judged_wrong=agree[("wrong", True)], configurations_disagreeing=mismatched)


def compose_eval(overrides: list[str]):
    """The seqrl-eval config for `overrides`, composed and validated as the CLI does: (DictConfig, typed object)."""
    from hydra import compose, initialize_config_dir

    from seqrl.cli import conf_dir
    from seqrl.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    return cfg, validate(cfg)


def bench_e2e(name: str, overrides: list[str], args, rec: Record) -> None:
    """evaluate.py's loop (build sets, load the policy; then per set: generate in batches, grade, summarise)."""
    import lightning as L

    from seqrl.eval.harness import build_eval_sets, evaluate_rollout, generate_for_eval
    from seqrl.evaluate import load_policy

    _, c = compose_eval([*overrides, f"paths.data_dir={args.data_dir}", f"eval.grading_workers={args.e2e_workers}"])
    sets = build_eval_sets(c.eval, c.data, args.data_dir, skipped={})
    policy = load_policy(c)
    bs = max(1, c.eval.batch_size // c.eval.n_samples)
    items, tokens, gen_rates = [], [], []
    for rep in range(args.e2e_repeats + 1):  # the first is an untimed warm-up
        L.seed_everything(c.seed + rep, verbose=False)
        start, n_items, n_tokens, gen_s = time.perf_counter(), 0, 0, 0.0
        for es in sets:
            rolls = [generate_for_eval(policy, es.samples[i:i + bs], c.eval) for i in range(0, len(es.samples), bs)]
            evaluate_rollout(es, rolls, c.eval)
            n_items += len(es.samples)
            n_tokens += sum(int(r.lengths.sum()) for r in rolls)
            gen_s += sum(r.gen_seconds for r in rolls)
        if rep:
            items.append(n_items / (time.perf_counter() - start))
            tokens.append(n_tokens / gen_s)
    s_items, s_tok = summary(items), summary(tokens)
    print(f"{name:<28} items/s {s_items['min']:>7.1f} {s_items['median']:>7.1f} {s_items['max']:>7.1f}   "
          f"generated tokens/s {s_tok['min']:>8.0f} {s_tok['median']:>8.0f} {s_tok['max']:>8.0f}   "
          f"({n_items} items x {c.eval.n_samples} samples, {n_tokens} tokens per run)")
    rec.add(part="end to end", config=name, overrides=overrides, items=n_items, samples_per_item=c.eval.n_samples,
            generated_tokens=n_tokens, items_per_s=s_items, generated_tokens_per_s=s_tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "benchmarks"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="grading pool processes")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--e2e-workers", type=int, default=0, help="eval.grading_workers in the end-to-end runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for generation (0 = torch's default; 1 is the least sensitive to other load)")
    args = ap.parse_args()
    if args.workers < 2 or args.repeats < 1 or args.e2e_repeats < 1:
        ap.error(f"--workers {args.workers} (must be >= 2), --repeats {args.repeats} and --e2e-repeats "
                 f"{args.e2e_repeats} (must be >= 1)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not Path(args.data_dir, "math500", "test.jsonl").is_file():
        raise SystemExit(f"--data-dir {args.data_dir}: no math500/test.jsonl there; give the benchmarks directory")
    rec = Record("eval", {k: v for k, v in vars(args).items()})
    bench_grading(math500_golds(args.data_dir), args, rec)
    if not args.skip_e2e:
        print(f"\nend to end, {args.e2e_repeats} repeats (min / median / max)")
        bench_e2e("tiny_dense on arith", ["model=tiny_dense", "data=arith", "eval=smoke"], args, rec)
        bench_e2e("oracle on math500", ["model=oracle", "eval=smoke", "eval.heldout=false", "eval.n_samples=1",
                                        "+benchmark@eval.benchmarks.math500=math500"], args, rec)
    rec.note("grading: one response per gold; repeat r uses answer_variants shift r; no cache crosses grade_many "
             "calls; the LaTeX parser's (ANTLR) prediction cache and sympy's cache stay warm within the process, as "
             "in any long evaluation; first pass = the untimed warm-up call of each configuration (the first one and "
             "the first pool one include start-up); items per CPU-second counts this process + the pool's workers")
    rec.write()


if __name__ == "__main__":
    main()
