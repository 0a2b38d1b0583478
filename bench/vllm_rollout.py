"""Rollout tokens/s on one GPU: the vLLM engine (`rollout.engine=vllm`) vs the HF engine, same model and prompts.

    python bench/vllm_rollout.py                                  # tiny_dense, 32 prompts x 8, 128 tokens, 5 repeats
    python bench/vllm_rollout.py --model small_dense --prompts 64 --max-new-tokens 256

Needs a CUDA GPU and vLLM (`pip install 'seqrl[vllm]'`); without either it says so and exits with status 2.
Both engines sample at temperature 1 from the same policy (on the GPU, its configured dtype) for the same prompts,
n responses each, within the same token budget; repeats alternate HF / vLLM. Tokens/s counts generated response
tokens (up to the stop token) per second of generation (prefill + decoding); vLLM's in-memory weight push, done
before every rollout, is timed apart (`sync s`). One untimed warm-up call per engine (vLLM's start-up, CUDA graphs).
Writes results/perf/vllm_rollout.json (see bench/common.py).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common import Record
from seqrl.algorithms.rollout import hf_generate
from seqrl.algorithms.vllm_engine import import_vllm, release_engine, vllm_generate
from seqrl.config import DataConfig, RolloutConfig
from seqrl.data import load_samples
from seqrl.models import build_policy

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def prompts_on_model_device(policy):
    """hf_generate with the policy's prompt tensors on the model's device (its encode_prompts returns CPU tensors)."""
    encode = policy.encode_prompts
    device = next(policy.model.parameters()).device
    policy.encode_prompts = lambda *a, **k: {key: value.to(device) for key, value in encode(*a, **k).items()}
    try:
        yield
    finally:
        del policy.encode_prompts  # the class method again


def rollout(engine: str, policy, samples, cfg, n: int, greedy: bool = False):
    """One rollout of `engine` ("hf" or "vllm"), returned with its tensors on the CPU."""
    if engine == "vllm":
        return vllm_generate(policy, samples, cfg, n=n, greedy=greedy)
    with prompts_on_model_device(policy):
        batch = hf_generate(policy, samples, cfg, n=n, greedy=greedy)
    for key in ("input_ids", "attention_mask", "response_mask", "truncated"):
        setattr(batch, key, getattr(batch, key).cpu())
    return batch


def tokens_per_s(engine: str, policy, samples, cfg, n: int, seed: int) -> tuple[float, float, float]:
    """(generated tokens per second, generation seconds, weight-sync seconds) of one rollout."""
    torch.manual_seed(seed)
    batch = rollout(engine, policy, samples, cfg, n)
    return (float(batch.response_mask.sum()) / batch.gen_seconds, batch.gen_seconds,
            batch.metrics.get("perf/weight_sync_s", 0.0))


def load_prompts(data: str, k: int) -> list:
    """The first k training prompts of conf/data/<data>.yaml."""
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / f"{data}.yaml"))
    return load_samples(OmegaConf.to_object(cfg), "train", str(ROOT.parent / "shared" / "benchmarks"))[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_dense", help="a conf/model/*.yaml name")
    ap.add_argument("--data", default="arith", help="a conf/data/*.yaml name")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    try:
        import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
    except (ImportError, RuntimeError) as exc:
        print(f"bench/vllm_rollout.py: {exc}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    policy = build_policy(OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    policy.model.cuda()
    samples = load_prompts(args.data, args.prompts)
    cfg = RolloutConfig(group_size=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    rec = Record("vllm_rollout", settings=vars(args))
    for engine in ("hf", "vllm"):  # untimed warm-up (vLLM: engine start-up)
        tokens_per_s(engine, policy, samples, cfg, args.n, seed=12345)
    runs: dict[str, list[tuple[float, float, float]]] = {"hf": [], "vllm": []}
    for rep in range(args.repeats):
        for engine in (("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")):
            runs[engine].append(tokens_per_s(engine, policy, samples, cfg, args.n, seed=rep))
    release_engine(policy)
    print(f"{args.model}: {args.prompts} prompts x {args.n}, budget {args.max_new_tokens} tokens, "
          f"{args.repeats} repeats, {torch.cuda.get_device_name()}")
    print(f"{'engine':<7} {'tokens/s min':>12} {'median':>10} {'max':>10} {'gen s':>8} {'sync s':>8}")
    for engine, rows in runs.items():
        rates = [r for r, _, _ in rows]
        gen_s, sync_s = statistics.median(s for _, s, _ in rows), statistics.median(s for _, _, s in rows)
        print(f"{engine:<7} {min(rates):>12.0f} {statistics.median(rates):>10.0f} {max(rates):>10.0f} "
              f"{gen_s:>8.3f} {sync_s:>8.3f}")
        rec.add(engine=engine, tokens_per_s_min=min(rates), tokens_per_s_median=statistics.median(rates),
                tokens_per_s_max=max(rates), gen_s_median=gen_s, weight_sync_s_median=sync_s)
    ratio = statistics.median(r for r, _, _ in runs["vllm"]) / statistics.median(r for r, _, _ in runs["hf"])
    print(f"vllm/hf (ratio of medians) {ratio:.2f}")
    rec.note(f"vllm/hf ratio of median tokens/s: {ratio:.2f}; device {torch.cuda.get_device_name()}")
    rec.write()


if __name__ == "__main__":
    main()
