"""Model FLOPs utilisation (MFU) of the RL update on the CPU, against the machine's measured fp32 matmul peak.

    python bench/mfu.py                          # all cores; small_dense, 64 rows x (prompt + 64..128 tokens)
    python bench/mfu.py --threads 1 --steps 5    # one thread (the least sensitive to other processes' load)

(a) Peak: best-of-N fp32 `torch.matmul` GFLOP/s (2*M*K*N per product) over the model's own projection shapes and
    squares up to 4096, at --threads and at 1 thread, again after the update (load changes); the best is the peak.
    Per wall second and per CPU second of the process (the latter is robust to other processes taking the cores).
(b) Update: seqrl's own path, as RLModule.training_step/_update run it (one epoch, one minibatch): the reference
    forward without grad (kl_coef > 0), then `response_logprobs(..., entropy=True, buckets=--buckets)` ->
    `compute_policy_loss` -> backward -> clip_grad_norm_ -> AdamW step, timed per phase. The batch: the first
    --prompts arith training prompts x --group rows (chat template, left padded) with random response tokens of
    lengths uniform in [--min-response, --max-response] closed by EOS, right padded.
    Model FLOPs: N = weights of every nn.Linear (attention, MLP, LM head; the LM head counts although its weight is
    tied to the embedding), L layers, d_attn = heads * head_dim. A token costs 2 * N forward (x3 with backward,
    as in PaLM, arXiv 2204.02311, app. B) plus attention 4 * L * d_attn * c forward (x3), c = the keys it attends to
    (its position + 1: causal; PaLM's non-causal convention counts the whole sequence). Counted over real tokens
    only (no padding), each distinct prompt once (rows of a group share it; `response_logprobs` encodes it once):
        required = 6 N (sum_u p_u + sum_i r_i) + 12 L d_attn (sum_u p_u(p_u+1)/2 + sum_i (r_i p_i + r_i(r_i+1)/2))
    (p = real prompt tokens, r = real response tokens; u over distinct prompts, i over rows). MFU = required /
    median update seconds / peak. Also reported: `per_row` (every row's prompt counted, the full-width count) and
    `executed_linear` (FLOPs the nn.Linear matmuls actually ran, padding included, counted by
    torch.utils.flop_counter on one update), whose ratio to the profiled matmul time is the GEMMs' own efficiency.
(c) Decode: generated tokens/s of ROLLOUTS["standard"] on the same prompts, and 2 * N per token as a share of peak.
A torch.profiler pass over one update splits self CPU time by phase (forward incl. log-softmax and loss / backward /
optimizer) and operator class. Writes results/perf/mfu.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Record, summary  # noqa: E402
from rollout import load_prompts  # noqa: E402

from seqrl.algorithms import compute_policy_loss, load_algorithm  # noqa: E402
from seqrl.algorithms.rollout import ROLLOUTS, RolloutBatch, response_logprobs  # noqa: E402
from seqrl.config import RolloutConfig  # noqa: E402
from seqrl.models import build_policy  # noqa: E402

# Operator classes of the profile (aten names without "aten::"): (class, exact names, name parts); first match wins.
OP_CLASSES = (
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear"), ()),
    ("attention kernel", (), ("scaled_dot_product", "attention")),
    ("vocab log-softmax/gather", ("exp", "exp_"), ("logsumexp", "softmax", "gather", "scatter")),
    ("copy/layout/fill", ("t", "to", "cat", "view", "stack", "clone", "contiguous", "reshape", "expand", "transpose",
                          "zeros", "fill_", "zero_", "copy_", "_to_copy", "as_strided", "constant_pad_nd", "repeat"),
     ("slice", "select", "index", "empty", "unsqueeze", "squeeze", "narrow", "split", "permute", "_unsafe_view")),
)


def op_class(name: str) -> str:
    """The operator class of a profiler event; non-aten events (autograd engine, scopes) are framework/python."""
    if not name.startswith("aten::"):
        return "framework/python"
    op = name[len("aten::"):]
    return next((cls for cls, exact, parts in OP_CLASSES if op in exact or any(p in op for p in parts)),
                "elementwise/norm/optimizer math")


def matmul_rate(m: int, k: int, n: int, repeats: int, min_s: float = 0.2) -> tuple[list[float], list[float]]:
    """GFLOP/s of fp32 (m, k) @ (k, n) products, per wall and per CPU second: `repeats` timings, each of enough
    back-to-back products to last >= min_s (the process CPU clock of other threads advances in scheduler ticks)."""
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)
    inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        wall.append(2 * m * k * n * inner / (time.perf_counter() - t0) / 1e9)
        cpu.append(2 * m * k * n * inner / max(time.process_time() - c0, 1e-6) / 1e9)
    return wall, cpu


def matmul_shapes(d: int, ffn: int, vocab: int, tokens: int) -> list[tuple[str, int, int, int]]:
    """(label, M, K, N): the model's projections over one update's tokens, then squares."""
    return [("tokens x d -> ffn (MLP up/gate)", tokens, d, ffn), ("tokens x ffn -> d (MLP down)", tokens, ffn, d),
            ("tokens x d -> d (q/o proj)", tokens, d, d), ("tokens x d -> vocab (LM head)", tokens, d, vocab),
            *((f"square {s}", s, s, s) for s in (512, 1024, 2048, 4096))]


def measure_peak(rec: Record, shapes, threads_list: list[int], repeats: int, when: str) -> dict[int, dict]:
    """Best GFLOP/s per thread count over `shapes` ({"wall", "cpu"}); one record row per (shape, threads)."""
    peak: dict[int, dict] = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        best = peak.setdefault(threads, {"wall": 0.0, "cpu": 0.0})
        for label, m, k, n in shapes:
            wall, cpu = matmul_rate(m, k, n, repeats)
            rec.add(part="matmul", when=when, shape=label, m=m, k=k, n=n, threads=threads,
                    gflops_best=round(max(wall), 1), gflops_median=round(statistics.median(wall), 1),
                    gflops_per_cpu_s_best=round(max(cpu), 1))
            print(f"matmul {label:<32} {m:>6}x{k:<5}x{n:<5} {threads} thr: best {max(wall):7.1f} GFLOP/s, "
                  f"median {statistics.median(wall):7.1f}; per CPU-s best {max(cpu):7.1f}", flush=True)
            best["wall"], best["cpu"] = max(best["wall"], max(wall)), max(best["cpu"], max(cpu))
    return peak


def rollout_batch(policy, samples: list, g: int, lo: int, hi: int, seed: int) -> RolloutBatch:
    """A rollout-shaped batch: real prompts x g rows, random responses of lengths U[lo, hi] closed by EOS."""
    gen = torch.Generator().manual_seed(seed)
    rows = [s for s in samples for _ in range(g)]
    enc = policy.encode_prompts([s.prompt for s in rows])
    special = set(policy.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(policy.tokenizer)) if i not in special])
    lengths = torch.randint(lo, hi + 1, (len(rows),), generator=gen)  # (N,) EOS included
    T = int(lengths.max())
    resp = ordinary[torch.randint(len(ordinary), (len(rows), T), generator=gen)]  # (N, T)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()  # (N, T)
    resp[torch.arange(len(rows)), lengths - 1] = policy.eos_token_id
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, policy.pad_token_id))
    return RolloutBatch(samples=rows, input_ids=torch.cat([enc["input_ids"], resp], 1),
                        attention_mask=torch.cat([enc["attention_mask"], mask.long()], 1), response_mask=mask,
                        prompt_len=enc["input_ids"].shape[1], group_ids=torch.arange(len(samples)).repeat_interleave(g),
                        texts=[""] * len(rows), truncated=torch.zeros(len(rows), dtype=torch.bool))


def model_dims(model) -> dict:
    """N (nn.Linear weights, LM head included), layers, d_attn."""
    c = model.config
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"N": n, "L": c.num_hidden_layers, "d_attn": c.num_attention_heads * head_dim}


def model_flops(dims: dict, batch: RolloutBatch, passes: int, shared: bool = True) -> tuple[float, int]:
    """(model FLOPs, tokens) of the batch's real tokens; passes 3 = forward + backward, 1 = forward. shared: each
    distinct prompt once (else every row's prompt: the full-width count). Causal attention: c = position + 1."""
    P = batch.prompt_len
    p = batch.attention_mask[:, :P].sum(1).double()  # (N,)
    r = batch.attention_mask[:, P:].sum(1).double()  # (N,)
    first = torch.unique(batch.row_prompts, return_inverse=True)[1]  # (N,) distinct prompt of each row
    pu = p.new_zeros(int(first.max()) + 1).scatter_(0, first, p) if shared else p  # (U,) prompt lengths
    tokens = pu.sum() + r.sum()
    ctx = (pu * (pu + 1) / 2).sum() + (r * p + r * (r + 1) / 2).sum()
    return float(2 * passes * dims["N"] * tokens + 4 * passes * dims["L"] * dims["d_attn"] * ctx), int(tokens)


def update_step(policy, opt, algo, batch, adv, ref_policy, args) -> dict[str, float]:
    """training_step's reference forward, then one RLModule._update optimizer step on the whole batch; seconds per
    phase (profiler scopes phase/<name>) and CPU seconds of the update."""
    ref_logp, t0 = None, time.perf_counter()
    if ref_policy is not None:
        with record_function("phase/reference"), torch.no_grad():
            ref_logp = response_logprobs(ref_policy, batch, 1.0, buckets=args.buckets)[0]  # (N, T)
    t1, c1 = time.perf_counter(), time.process_time()
    with record_function("phase/forward"):
        logp, ent, _ = response_logprobs(policy, batch, 1.0, entropy=True, buckets=args.buckets)  # (N, T), (N, T)
        loss, _ = compute_policy_loss(algo, logp, logp.detach(), adv, batch.response_mask, ref_logp=ref_logp,
                                      norm_const=float(args.max_response))
        float(loss.detach())  # the module's finite check synchronises here too
    t2 = time.perf_counter()
    with record_function("phase/backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    t3 = time.perf_counter()
    with record_function("phase/optimizer"):
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        opt.step()
    t4, c4 = time.perf_counter(), time.process_time()
    float((ent * batch.response_mask).sum())
    return {"reference": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t1,
            "cpu": c4 - c1}


def profile_split(step, rec: Record, top: int = 12) -> float:
    """Profile one call of `step`: self CPU seconds per (phase, operator class) and the top operators, printed and
    recorded. Returns the matmul seconds of the update (forward + backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split: dict[tuple[str, str], float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        phase, parent = "outside", ev
        while parent is not None and not parent.name.startswith("phase/"):
            parent = parent.cpu_parent
        phase = parent.name[len("phase/"):] if parent is not None else phase
        sec = ev.self_cpu_time_total / 1e6
        split[(phase, "framework/python" if ev.name.startswith("phase/") else op_class(ev.name))] += sec
        ops[ev.name] += sec
    total = sum(sec for (phase, _), sec in split.items() if phase != "reference")
    for (phase, cls), sec in sorted(split.items(), key=lambda kv: -kv[1]):
        rec.add(part="profile", phase=phase, op_class=cls, self_s=round(sec, 3), frac_of_update=round(sec / total, 3))
        print(f"  profile {phase:<10} {cls:<32} {sec:7.3f} s  {sec / total:6.1%} of the update")
    for name, sec in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        rec.add(part="profile_op", op=name, self_s=round(sec, 3))
        print(f"    op {name:<56} {sec:7.3f} s")
    return sum(sec for (phase, cls), sec in split.items() if cls == "matmul" and phase in ("forward", "backward"))


def bench_update(rec: Record, args, policy, batch) -> dict:
    """Time --steps updates (after one warm-up), count the executed matmul FLOPs, profile one update."""
    algo = load_algorithm(args.algorithm)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))  # (N,)
    ref = None
    if algo.kl_coef > 0:  # training_step's frozen reference
        ref = dataclasses.replace(policy, model=copy.deepcopy(policy.model).eval().requires_grad_(False))
    run = lambda: update_step(policy, opt, algo, batch, adv, ref, args)  # noqa: E731
    run()  # warm-up
    times = [run() for _ in range(args.steps)]
    with FlopCounterMode(display=False) as counter:
        run()
    executed = counter.get_total_flops()
    if ref is not None:  # the update's own: less the reference forward's
        with FlopCounterMode(display=False) as ref_counter, torch.no_grad():
            response_logprobs(ref, batch, 1.0, buckets=args.buckets)
        executed -= ref_counter.get_total_flops()
    matmul_s = profile_split(run, rec)
    return {"times": times, "executed_linear": executed, "matmul_s": matmul_s, "reference": ref is not None}


def report_update(rec: Record, args, policy, batch, res: dict, peak: dict) -> None:
    """Model FLOPs, MFU (per wall and per CPU second) and the phase split."""
    times, dims = res["times"], model_dims(policy.model)
    (f_req, tok_req), (f_row, tok_row) = model_flops(dims, batch, 3), model_flops(dims, batch, 3, shared=False)
    med, cpu = (statistics.median(t[k] for t in times) for k in ("total", "cpu"))
    mfu = lambda flops, sec, kind="wall": round(flops / sec / 1e9 / peak[kind], 4)  # noqa: E731
    row = {"part": "update", "algorithm": args.algorithm, "threads": args.threads, "buckets": args.buckets,
           "rows": len(batch), "width_padded": int(batch.input_ids.shape[1]), "tokens_required": tok_req,
           "tokens_per_row_real": tok_row, "tokens_padded": int(batch.input_ids.numel()), **dims,
           "tflop_required": round(f_req / 1e12, 4), "tflop_per_row": round(f_row / 1e12, 4),
           "tflop_executed_linear": round(res["executed_linear"] / 1e12, 4),
           "step_s": summary([round(t["total"], 3) for t in times]), "step_cpu_s_median": round(cpu, 3),
           "gflops_required": round(f_req / med / 1e9, 1), "peak_gflops": round(peak["wall"], 1),
           "peak_gflops_per_cpu_s": round(peak["cpu"], 1), "mfu": mfu(f_req, med),
           "mfu_best_step": mfu(f_req, min(t["total"] for t in times)), "mfu_cpu_time": mfu(f_req, cpu, "cpu"),
           "mfu_per_row": mfu(f_row, med), "mfu_executed_linear": mfu(res["executed_linear"], med),
           "matmul_efficiency": round(res["executed_linear"] / res["matmul_s"] / 1e9 / peak["wall"], 4),
           "target_mfu": 0.30}
    for phase in ("forward", "backward", "optimizer"):
        row[f"{phase}_s"] = round(statistics.median(t[phase] for t in times), 3)
        row[f"{phase}_frac"] = round(row[f"{phase}_s"] / med, 3)
    if res["reference"]:
        ref_s = statistics.median(t["reference"] for t in times)
        row.update(reference_s=round(ref_s, 3), reference_mfu=mfu(model_flops(dims, batch, 1)[0], ref_s))
    rec.add(**row)
    print(f"update: {tok_req} required tokens ({tok_row} per row, {row['tokens_padded']} padded), median {med:.3f} s "
          f"(fwd {row['forward_s']} / bwd {row['backward_s']} / opt {row['optimizer_s']}); {row['gflops_required']} "
          f"GFLOP/s; MFU {row['mfu']:.1%} (best step {row['mfu_best_step']:.1%}, per CPU-s {row['mfu_cpu_time']:.1%},"
          f" per-row count {row['mfu_per_row']:.1%}, executed linear {row['mfu_executed_linear']:.1%}); GEMMs at "
          f"{row['matmul_efficiency']:.1%} of peak; reference forward {row.get('reference_s')} s", flush=True)
    if row["mfu"] > 1 or row["matmul_efficiency"] > 1:
        rec.note("a ratio > 1: the peak was measured under heavier load than the update; read mfu_cpu_time")


def bench_decode(rec: Record, args, policy, samples, peak: dict) -> None:
    """Generated tokens/s of --decode-repeats standard rollouts (after one untimed call)."""
    cfg = RolloutConfig(group_size=args.group, max_new_tokens=args.decode_tokens)
    runs = []
    for rep in range(args.decode_repeats + 1):
        torch.manual_seed(rep)
        roll = ROLLOUTS["standard"](policy, samples, cfg, n=args.group)
        runs.append((float(roll.response_mask.sum()) / roll.gen_seconds, float(roll.response_mask.sum())))
    rates = [r for r, _ in runs[1:]]
    med = statistics.median(rates)
    gflops = 2 * model_dims(policy.model)["N"] * med / 1e9
    rec.add(part="decode", rows=len(samples) * args.group, max_new_tokens=args.decode_tokens, threads=args.threads,
            tokens_per_s=summary([round(r, 1) for r in rates]), tokens_per_rollout=statistics.median(
                n for _, n in runs[1:]), gflops_2n=round(gflops, 2), frac_of_peak=round(gflops / peak["wall"], 4))
    print(f"decode: {len(samples) * args.group} rows, budget {args.decode_tokens}: median {med:.0f} tokens/s "
          f"({gflops:.1f} GFLOP/s = {gflops / peak['wall']:.1%} of peak)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_dense", help="conf/model/<name>.yaml (a dense model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--algorithm", default="grpo")
    ap.add_argument("--buckets", type=int, default=1, help="length_buckets of response_logprobs")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="rows per prompt (G)")
    ap.add_argument("--min-response", type=int, default=64)
    ap.add_argument("--max-response", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed update steps (after one warm-up step)")
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--decode-repeats", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "update"])
    args = ap.parse_args()
    for key in ("threads", "buckets", "prompts", "group", "min_response", "steps", "matmul_repeats",
                "decode_tokens", "decode_repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.max_response < args.min_response:
        raise ValueError(f"--max-response={args.max_response}: must be >= --min-response={args.min_response}")
    rec = Record("mfu", vars(args))
    torch.manual_seed(0)
    policy = build_policy(OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"))
    samples = load_prompts("tiny_dense", args.prompts)  # the arith training prompts
    batch = rollout_batch(policy, samples, args.group, args.min_response, args.max_response, seed=0)
    c = policy.model.config
    shapes = matmul_shapes(c.hidden_size, c.intermediate_size, c.vocab_size, int(batch.attention_mask.numel()))
    peak = measure_peak(rec, shapes, sorted({args.threads, 1}, reverse=True), args.matmul_repeats, "before")
    torch.set_num_threads(args.threads)
    res = bench_update(rec, args, policy, batch) if "update" not in args.skip else None
    print("peak again after the update (load changes): the model's shapes", flush=True)
    again = measure_peak(rec, shapes[:4], [args.threads], args.matmul_repeats, "after")[args.threads]
    top = {kind: max(peak[args.threads][kind], again[kind]) for kind in ("wall", "cpu")}
    print(f"peak at {args.threads} threads: {top['wall']:.1f} GFLOP/s, {top['cpu']:.1f} per CPU-s (1 thread: "
          f"{peak[1]['wall']:.1f}, {peak[1]['cpu']:.1f} per CPU-s)", flush=True)
    rec.add(part="peak", threads=args.threads, gflops=round(top["wall"], 1), gflops_per_cpu_s=round(top["cpu"], 1),
            gflops_1_thread=round(peak[1]["wall"], 1), gflops_per_cpu_s_1_thread=round(peak[1]["cpu"], 1))
    if res is not None:
        report_update(rec, args, policy, batch, res, top)
    if "decode" not in args.skip:
        bench_decode(rec, args, policy, samples, top)
    rec.note("MFU = required model FLOPs (real tokens, each distinct prompt once; 6N per token + causal attention "
             "12 L d_attn per attended key) / median update seconds / measured fp32 matmul peak")
    rec.write()


if __name__ == "__main__":
    main()
