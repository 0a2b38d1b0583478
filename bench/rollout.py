"""Generated tokens per second of the rollouts, same model and prompts: standard on seqrl's KV-cached loop (engine
hf, the default), standard on transformers' `generate()` (engine hf_generate), and EqLen.

    python bench/rollout.py                                   # tiny_dense, tiny_moe, tiny_vl; 5 repeats
    python bench/rollout.py --models tiny_dense --repeats 9 --extra-stops 10 --threads 0

All rollouts get the same prompts, the same n responses per prompt, the same token budget and the same seed in
each repeat; the order of the rollouts rotates between repeats so that load from other processes hits all alike.
Tokens/s counts generated tokens only: response tokens up to the stop token for the standard rollout, every
track's own tokens (forks included, inherited prefixes not) for EqLen, per second of prefill + decoding.
Reported: min / median / max over repeats, ratios of medians (to the standard rollout on engine hf), and the
median generated tokens per prompt and seconds per rollout (EqLen decodes more tokens per prompt: its forks).
Writes results/perf/rollout.json. `--extra-stops K` adds K characters to the stop
tokens, so the random-init models end responses early (varied lengths, hence forks) instead of running to the
budget.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Record, summary
from seqrl.algorithms.rollout import ROLLOUTS
from seqrl.config import DataConfig, RolloutConfig
from seqrl.data import load_samples
from seqrl.models import build_policy

ROOT = Path(__file__).resolve().parents[1]
DATA = {"tiny_dense": "arith", "tiny_moe": "arith", "tiny_vl": "image_count"}


def load_prompts(model: str, k: int) -> list:
    """The first k training prompts of the model's smoke data set (arith; image_count for vl)."""
    own = OmegaConf.load(ROOT / "conf" / "data" / f"{DATA[model]}.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), own)
    return load_samples(OmegaConf.to_object(cfg), "train", str(ROOT.parent / "shared" / "benchmarks"))[:k]


VARIANTS = {"standard/hf": ("standard", "hf"), "standard/hf_generate": ("standard", "hf_generate"),
            "eqlen": ("eqlen", "hf")}  # label -> (rollout.name, rollout.engine)


def measure(label: str, policy, samples, cfg, n: int, seed: int) -> tuple[float, float]:
    """(generated tokens per second, seconds) of one rollout."""
    name, engine = VARIANTS[label]
    torch.manual_seed(seed)
    batch = ROLLOUTS[name](policy, samples, replace(cfg, name=name, engine=engine), n=n)
    if name == "eqlen":
        return batch.metrics["perf/gen_tokens_per_s"], batch.gen_seconds
    return float(batch.response_mask.sum()) / batch.gen_seconds, batch.gen_seconds


def bench_model(model: str, args) -> dict[str, list[tuple[float, float]]]:
    torch.manual_seed(0)
    policy = build_policy(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml"))
    if args.extra_stops:
        policy.model.generation_config.eos_token_id = [policy.eos_token_id] + list(range(40, 40 + args.extra_stops))
    samples = load_prompts(model, args.prompts)
    cfg = RolloutConfig(name="eqlen", group_size=args.n, max_new_tokens=args.max_new_tokens,
                        eqlen_max_forks=args.max_forks)
    labels = list(VARIANTS)
    for label in labels:  # untimed warm-up call each
        measure(label, policy, samples, cfg, args.n, seed=12345)
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    for rep in range(args.repeats):
        for label in labels[rep % 3:] + labels[:rep % 3]:
            results[label].append(measure(label, policy, samples, cfg, args.n, seed=rep))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DATA), choices=list(DATA))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="responses per prompt (even)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-forks", type=int, default=8, help="rollout.eqlen_max_forks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-stops", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default; 1 is the least sensitive to other processes' load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.prompts} prompts x {args.n} responses, budget {args.max_new_tokens} tokens, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, extra stops {args.extra_stops}")
    record = Record("rollout", vars(args) | {"threads": torch.get_num_threads()})
    print(f"{'model':<11} {'rollout':<21} {'tokens/s min':>12} {'median':>9} {'max':>9} {'tokens/prompt':>14} "
          f"{'s/rollout':>10} {'x hf':>6}")
    for model in args.models:
        t0 = time.perf_counter()
        results = bench_model(model, args)
        base = statistics.median(r for r, _ in results["standard/hf"])
        for label, runs in results.items():
            rates, secs = summary([r for r, _ in runs]), summary([s for _, s in runs])
            per_prompt = statistics.median(r * s / args.prompts for r, s in runs)
            ratio = rates["median"] / base
            print(f"{model:<11} {label:<21} {rates['min']:>12.0f} {rates['median']:>9.0f} {rates['max']:>9.0f} "
                  f"{per_prompt:>14.0f} {secs['median']:>10.3f} {ratio:>6.2f}")
            record.add(model=model, rollout=label, tokens_per_s=rates, tokens_per_prompt=per_prompt,
                       seconds_per_rollout=secs, ratio_to_standard_hf=ratio)
        print(f"{model:<11} [{time.perf_counter() - t0:.0f} s]")
    record.note("x hf: ratio of median tokens/s to the standard rollout on engine hf (seqrl's KV-cached loop)")
    record.write()


if __name__ == "__main__":
    main()
