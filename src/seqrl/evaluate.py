"""`seqrl-eval`: evaluate a checkpoint (Lightning .ckpt or HF export dir) or a model config on a suite.

    seqrl-eval checkpoint=outputs/train/.../hf eval=smoke data=arith
    seqrl-eval checkpoint=outputs/train/.../hf eval=math  # AIME24, AIME25, MATH-500, AMC23
    seqrl-eval model=qwen2_5_vl_7b eval=vision            # a real model from the hub (GPU)
    seqrl-eval model=oracle eval=vision                   # graders against the references (must print 100.0)

Writes results.json (config, seed, git commit, versions, metrics per benchmark, skipped benchmarks), results.md
(the table, accuracies in %), samples/<benchmark>.jsonl, and logs the eval/<benchmark>/<metric> values to every
configured logger (W&B: history, summary and a table of samples) in the Hydra run directory. A benchmark that
cannot run (MathVista without its images) is skipped with one line; for the oracle every miss is printed with
its cause (grader bug, harness bug, or items it cannot tell apart).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("seqrl")


def load_policy(c):
    """The policy to evaluate: c.checkpoint (an HF export dir or a Lightning .ckpt), else c.model."""
    import torch

    from seqrl.models import build_policy

    ckpt = c.checkpoint
    if ckpt is None:
        return build_policy(c.model)
    path = Path(ckpt).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint={ckpt!r}: no such file or directory; give an HF export dir or a .ckpt file")
    if path.is_dir():
        return build_policy(replace(c.model, local_dir=str(path), name_or_path=None, tokenizer="auto"))
    policy = build_policy(c.model)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file must fail loudly
        raise RuntimeError(f"checkpoint={ckpt!r}: not a readable Lightning checkpoint ({exc})") from exc
    policy.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    return policy


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the configured policy on the configured suite; returns the results dict written to results.json."""
    import lightning as L

    from seqrl.config import validate
    from seqrl.eval.harness import build_eval_sets, evaluate_rollout, generate_for_eval, results_table, write_samples
    from seqrl.models import get_family
    from seqrl.results import provenance, write_json_atomic, write_text_atomic

    out = Path(cfg.paths.output_dir)
    c = validate(cfg)
    L.seed_everything(c.seed, verbose=False)
    skipped: dict[str, str] = {}
    eval_sets = build_eval_sets(c.eval, c.data, str(Path(c.paths.data_dir).expanduser()), skipped=skipped)
    for reason in skipped.values():
        print(f"seqrl-eval: skipping {reason}", flush=True)
    policy = load_policy(c)
    bs = max(1, c.eval.batch_size // c.eval.n_samples)
    results = {}
    for es in eval_sets:
        rolls = [generate_for_eval(policy, es.samples[i:i + bs], c.eval) for i in range(0, len(es.samples), bs)]
        results[es.name] = evaluate_rollout(es, rolls, c.eval)
        log.info("%s: %s", es.name, results[es.name]["metrics"])
    metrics = {name: r["metrics"] for name, r in results.items()}
    summary = {"run_name": f"eval-{c.model.family}", **provenance(OmegaConf.to_container(cfg, resolve=True), c.seed),
               "checkpoint": c.checkpoint, "eval": metrics, "skipped": skipped}
    write_samples(results, out)
    write_json_atomic(out / "results.json", summary)
    table = results_table(results, title=f"seqrl-eval {c.checkpoint or c.model.name_or_path or c.model.family}")
    write_text_atomic(out / "results.md", table + "\n")
    _log_to_loggers(cfg, out, summary["run_name"], results)
    print("\n" + table + "\n", flush=True)
    explain = getattr(get_family(c.model.family), "explain_miss", None)  # a policy that knows every reference
    if explain is not None:
        _print_misses(results, explain)
    return summary


def _log_to_loggers(cfg: DictConfig, out: Path, run_name: str, results: dict) -> None:
    """Every configured logger gets the flat eval/<benchmark>/<metric> values; W&B also a summary and, per
    benchmark, a table of (up to 200) samples; the offline run is flushed before returning."""
    from seqrl.loggers import build_loggers, wandb_logger

    flat = {f"eval/{b}/{k}": v for b, r in results.items() for k, v in r["metrics"].items()}
    loggers = build_loggers(cfg, out, run_name)
    for logger in loggers:
        logger.log_metrics(flat, step=0)
        logger.save()
    wb = wandb_logger(loggers)
    if wb is None:
        return
    wb.experiment.summary.update(flat)
    cols = ["item", "sample", "prompt", "completion", "extracted", "gold", "correct", "length"]
    for name, r in results.items():
        wb.log_table(f"eval/{name}/samples", columns=cols, data=[[rec[k] for k in cols] for rec in r["records"][:200]])
    wb.experiment.finish()


def _print_misses(results: dict, explain) -> None:
    """For a policy that knows every reference (the oracle): one line per wrong sample, saying why (`explain`)."""
    misses = [(name, rec) for name, r in results.items() for rec in r["records"] if not rec["correct"]]
    for name, rec in misses:
        print(f"{explain(rec)}: {name} item {rec['index']}: gold={rec['gold']!r} ({rec['kind']}) extracted="
              f"{rec['extracted']!r} completion={rec['completion'][-200:]!r}", flush=True)
    print(f"seqrl-eval: oracle check: {len(misses)} miss(es)" + (" (listed above)" if misses else ""), flush=True)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from seqrl.config import validate

    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        validate(cfg)
    except ValueError as exc:
        print(f"seqrl-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
    evaluate(cfg)


def main() -> None:
    from seqrl.cli import run_entry

    run_entry("eval", _task)


if __name__ == "__main__":
    main()
