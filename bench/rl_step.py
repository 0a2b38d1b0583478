"""Seconds per RL step: seqrl (RLModule through a Lightning Trainer) vs TRL's GRPOTrainer, same weights and work.

    python bench/rl_step.py                                 # grpo and gspo; 3 repeats of 2 warm-up + 5 timed steps
    python bench/rl_step.py --algos gspo --repeats 5 --override rollout.engine=hf_generate
    python bench/rl_step.py --profile --algos grpo          # cProfile one child per framework: where the time goes

One configuration (tiny_dense, 8 prompts x G=8, 48 new tokens, one optimizer step per RL step) per algorithm, in seqrl
and in TRL 1.16 (a bench-only dependency). Both load one HF directory (the tiny_dense policy built with --seed and saved
with its tokenizer, as seqrl-train exports `hf/`), take the first 8 arith training prompts (that tokenizer's chat
template), sample at temperature 1, top_p 1, no top-k, and score with seqrl's reward (grade_many + format_reward +
shape_rewards; wrapped for TRL). `matched()` derives every TRL setting from the composed seqrl config and lists what
TRL cannot match (printed, and in the record's notes).

Each (framework, algorithm, repeat) runs in a fresh child process (bench/_seqrl_side.py, bench/_trl_side.py): peak RSS
(ru_maxrss) is per framework, and repeats alternate seqrl/TRL so that other processes' load hits both alike. A child
runs --warmup untimed steps, then times --steps steps from the end of one to the end of the next (loop overhead and
per-step logging included, start-up not), in wall and in CPU seconds (its process time: far less sensitive to a shared
machine's load). Generated tokens/s = response tokens sampled (up to and including the stop token) / step time;
trained tokens/s = response tokens under the loss mask / step time (equal here: grpo and gspo filter nothing). The
ratio seqrl/TRL of trained tokens/s is taken per repeat (adjacent runs), per wall and per CPU second, as min/median/max.
Writes results/perf/rl_step.json (rl_step_<n>threads.json with --threads n > 1; bench/common.py).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from seqrl.algorithms.config import available_algorithms, load_algorithm
from seqrl.cli import conf_dir
from seqrl.config import register_configs, validate
from seqrl.data import load_samples

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import ROOT, Record, summary  # noqa: E402

DATA_DIR = ROOT.parent / "shared" / "benchmarks"
FRAMEWORKS = {"seqrl": BENCH / "_seqrl_side.py", "trl": BENCH / "_trl_side.py"}
TRL_LOSS_TYPE = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo"}
TRL_IS_LEVEL = {"token_clip": "token", "gspo": "sequence"}
TRL_SCALE = {"grpo": "group", "dr_grpo": "none"}


# ------------------------------------------------------------------------------------------- shared by the children
def seqrl_overrides(job: dict) -> list[str]:
    """Hydra overrides of the benchmarked seqrl run (also the source of every TRL setting, see `matched`)."""
    return [f"algorithm={job['algo']}", "model=tiny_dense", f"model.local_dir={job['hf_dir']}", "model.tokenizer=auto",
            "data=arith", f"paths.data_dir={DATA_DIR}", f"prompts_per_step={job['prompts']}",
            f"rollout.group_size={job['G']}", f"rollout.max_new_tokens={job['max_new_tokens']}",
            "algorithm.ppo_epochs=1", "algorithm.ppo_minibatches=1", "logger=csv", "sample_table_every=0",
            f"trainer.max_steps={job['warmup'] + job['steps']}", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"threads={job['threads']}", f"seed={job['seed']}",
            *job.get("overrides", [])]


def compose_train(overrides: list[str]):
    """The seqrl-train config for `overrides`, composed and validated as the CLI does: (DictConfig, typed object)."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return cfg, validate(cfg)


def load_prompts(c) -> list:
    """The first `prompts_per_step` training prompts of the run's data set (arith)."""
    return load_samples(c.data, "train", str(DATA_DIR))[: c.prompts_per_step]


class StepMarks:
    """A child's (wall, CPU) time stamps at the start of training and the end of every RL step; with a profile path,
    cProfile runs over the timed steps only. Each framework's trainer callback calls begin() and step_end()."""

    def __init__(self, job: dict, phases: list, step_fn: tuple[str, str]):
        self.warmup, self.steps, self.path = job["warmup"], job["steps"], job.get("profile")
        self.phases, self.step_fn = phases, step_fn
        self.profiler = cProfile.Profile() if self.path else None
        self.marks: list[tuple[float, float]] = []
        self.done = 0

    def begin(self) -> None:
        self._stamp(self.warmup == 0)

    def step_end(self) -> None:
        self.done += 1
        self._stamp(self.done == self.warmup)
        if self.profiler is not None and self.done == self.warmup + self.steps:
            self.profiler.disable()
            self.profiler.dump_stats(self.path)

    def _stamp(self, start_profile: bool) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))
        if self.profiler is not None and start_profile:
            self.profiler.enable()

    def timed(self) -> dict:
        """Wall and CPU seconds of each timed step (end of the previous step, or the start, to the end of this one);
        with the profile, also the per-step phases (see `breakdown`)."""
        if self.done != self.warmup + self.steps:
            raise RuntimeError(f"the trainer ran {self.done} steps; expected {self.warmup} + {self.steps}")
        marks = self.marks[-(self.steps + 1):]
        out = {"step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
               "cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])]}
        if self.path:
            out["phases"] = breakdown(self.path, self.phases, self.step_fn, sum(out["step_s"]), self.steps)
        return out


def write_result(job: dict, result: dict) -> None:
    """A child's last act: its result, with its own peak RSS, as JSON at job['out']."""
    result["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(job["out"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- configuration
def matched(c) -> tuple[dict, list[tuple[str, str, str]], list[str]]:
    """GRPOConfig kwargs that reproduce seqrl's run `c`, the (setting, seqrl, TRL) table, and the mismatches."""
    a, r, o = c.algorithm, c.rollout, c.optim
    for key, table, value in (("policy_loss", TRL_IS_LEVEL, a.policy_loss), ("agg", TRL_LOSS_TYPE, a.agg),
                              ("advantage", TRL_SCALE, a.advantage)):
        if value not in table:
            raise ValueError(f"algorithm.{key}={value!r}: no TRL equivalent here; allowed: {', '.join(table)}")
    for key, allowed in (("ppo_epochs", 1), ("ppo_minibatches", 1), ("dynamic_sampling", False), ("dual_clip_c", None)):
        if getattr(a, key) != allowed:  # one optimizer step per RL step; no TRL counterpart for the other two
            raise ValueError(f"algorithm.{key}={getattr(a, key)!r}: not matched in this bench; allowed: {allowed}")
    if a.kl_coef > 0 and a.kl_estimator != "k3":
        raise ValueError(f"algorithm.kl_estimator={a.kl_estimator!r}: TRL's KL is k3 only; allowed: k3")
    rows = c.prompts_per_step * r.group_size
    trl = dict(per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=r.group_size,
               max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
               num_iterations=a.ppo_epochs, beta=a.kl_coef, use_bias_correction_kl=False, epsilon=a.clip_low,
               epsilon_high=a.clip_high, importance_sampling_level=TRL_IS_LEVEL[a.policy_loss],
               loss_type=TRL_LOSS_TYPE[a.agg], scale_rewards=TRL_SCALE[a.advantage],
               mask_truncated_completions=a.overlong_filter,
               learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
               max_grad_norm=o.grad_clip, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
               bf16=False, gradient_checkpointing=c.model.gradient_checkpointing, seed=c.seed)
    table = [
        ("weights / tokenizer", "HF dir (tiny_dense, seed-built)", "same HF dir"),
        ("prompts", f"first {c.prompts_per_step} arith train, chat template", "same, conversational"),
        ("sampling", f"G={r.group_size}, max_new_tokens={r.max_new_tokens}, T={r.temperature:g} top_p={r.top_p:g} "
         f"top_k={r.top_k}", f"num_generations, max_completion_length, temperature, top_p, top_k: same"),
        ("update", f"ppo_epochs={a.ppo_epochs} x ppo_minibatches={a.ppo_minibatches} ({rows} rows)",
         f"num_iterations={a.ppo_epochs}, batch {rows}, grad_accum 1, steps_per_generation 1"),
        ("old log-probs", "skipped (one on-policy update)", "skipped (same rule)"),
        ("ratio / clip", f"{a.policy_loss}, [1-{a.clip_low:g}, 1+{a.clip_high:g}]",
         f"importance_sampling_level={trl['importance_sampling_level']}, epsilon={a.clip_low:g}/{a.clip_high:g}"),
        ("KL", f"kl_coef={a.kl_coef:g} ({a.kl_estimator}), frozen copy" if a.kl_coef else "none (kl_coef=0)",
         f"beta={a.kl_coef:g}, use_bias_correction_kl=False" + (", ref loaded from dir" if a.kl_coef else "")),
        ("aggregation", a.agg, f"loss_type={trl['loss_type']}"),
        ("rows with advantage 0", "not scored: loss and gradient exactly 0" if a.kl_coef == 0 else
         "scored (the KL term has a gradient)", "scored"),
        ("advantage", f"{a.advantage}: (r-mean)/(std+{a.adv_eps:g})", f"scale_rewards={trl['scale_rewards']}: +1e-4"),
        ("reward", f"grade_many + format_reward + shape_rewards, overlong_filter={a.overlong_filter}",
         f"the same functions, wrapped; mask_truncated_completions={a.overlong_filter}"),
        ("optimizer", f"AdamW lr={o.lr:g} wd={o.weight_decay:g}, clip {o.grad_clip:g}, constant LR",
         "optim=adamw_torch, same values, lr_scheduler_type=constant"),
        ("precision / checkpointing", f"fp32, {c.model.gradient_checkpointing}", "bf16=False, same"),
        ("logging / saving", "CSVLogger every step, no checkpoints", "report_to=none, logging_steps=1, no saving"),
    ]
    gaps = [f"advantage eps: seqrl {a.adv_eps:g}, TRL 1e-4 (hard-coded); no effect on cost",
            "seqrl-train also saves last.ckpt after every RL step (ModelCheckpoint); left out, as TRL saves nothing",
            "entropy: both compute it; seqrl from the scored rows' logits (the rollout's on rows left unscored), TRL "
            "through its fused chunked LM head"]
    own = load_algorithm(a.name)  # the values of conf/algorithm/<name>.yaml
    if (own.ppo_epochs, own.ppo_minibatches) != (1, 1):
        gaps.append(f"conf/algorithm/{a.name}.yaml has ppo_epochs={own.ppo_epochs}, ppo_minibatches="
                    f"{own.ppo_minibatches}; run with 1 x 1 (one optimizer step per RL step, as TRL with "
                    "steps_per_generation=1), so the update is on-policy and no clip binds, in both")
    return trl, table, gaps


# --------------------------------------------------------------------------------------------------------- driver
def export_policy(seed: int, out: Path) -> Path:
    """Build the tiny_dense policy once (torch seeded) and save it with its tokenizer, as seqrl-train's `hf/`."""
    from omegaconf import OmegaConf
    from transformers.utils import logging as hf_logging

    from seqrl.models import build_policy

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    policy = build_policy(OmegaConf.load(ROOT / "conf" / "model" / "tiny_dense.yaml"))
    policy.save(str(out))
    return out


def run_child(framework: str, job: dict) -> dict:
    """Run one framework's repeat in a fresh process; its JSON result (step times, tokens, peak RSS)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(FRAMEWORKS[framework]), json.dumps(job)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(job["out"]).read_text())


def per_repeat(res: dict) -> dict:
    """Wall and CPU seconds per step, tokens/s and peak RSS of one child's timed steps."""
    wall, cpu, n, trained = sum(res["step_s"]), sum(res["cpu_s"]), len(res["step_s"]), sum(res["trained_tokens"])
    return {"s_per_step": wall / n, "cpu_s_per_step": cpu / n, "gen_tok_s": sum(res["gen_tokens"]) / wall,
            "trained_tok_s": trained / wall, "trained_tok_cpu_s": trained / cpu, "rss_mib": res["maxrss_mib"],
            "tokens_per_step": sum(res["gen_tokens"]) / n}


def fmt(s: dict, digits: int = 2) -> str:
    """min / median / max of a `summary`."""
    return f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=["grpo", "gspo"], choices=available_algorithms())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per child")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per child")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra seqrl-train "
                    "override (repeatable), e.g. rollout.engine=hf_generate; TRL's settings follow the result")
    ap.add_argument("--profile", nargs="?", const=str(Path(tempfile.gettempdir()) / "rl_step_profiles"), metavar="DIR",
                    help="cProfile one child per framework and algorithm, print phases, keep .prof in DIR (%(const)s)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when piped
    for key in ("repeats", "warmup", "steps", "prompts", "G", "max_new_tokens", "threads"):
        if getattr(args, key) < (low := int(key != "warmup")):
            raise SystemExit(f"rl_step.py: error: --{key.replace('_', '-')}={getattr(args, key)}: must be >= {low}")
    torch.set_num_threads(args.threads)  # as in the children (the record's machine block reads it)
    with tempfile.TemporaryDirectory(prefix="rl_step.") as tmp:
        hf_dir = export_policy(args.seed, Path(tmp) / "hf")
        base = dict(hf_dir=str(hf_dir), prompts=args.prompts, G=args.G, max_new_tokens=args.max_new_tokens,
                    warmup=args.warmup, steps=args.steps, threads=args.threads, seed=args.seed, overrides=args.override)
        try:
            profile_all(args, base, Path(tmp)) if args.profile else bench(args, base, Path(tmp))
        except ValueError as exc:  # a configuration TRL cannot match, a bad --override
            raise SystemExit(f"rl_step.py: error: {exc}") from None


def bench(args, base: dict, tmp: Path) -> None:
    """Alternate seqrl/TRL children for every algorithm and repeat; print the table and write the record."""
    name = "rl_step" if args.threads == 1 else f"rl_step_{args.threads}threads"  # one record per thread count
    record = Record(name, {k: v for k, v in base.items() if k != "hf_dir"} | {"repeats": args.repeats})
    results: dict = {}
    for algo in args.algos:
        _, c = compose_train(seqrl_overrides(base | {"algo": algo}))
        trl_kwargs, table, gaps = matched(c)
        print(f"\n== {algo}: configuration (seqrl | TRL)")
        for name, ours, theirs in table:
            print(f"  {name:<26} {ours:<52} | {theirs}")
        for gap in gaps:
            print(f"  mismatch: {gap}")
            record.note(f"{algo}: {gap}")
        record.settings[f"trl_{algo}"] = trl_kwargs
        for rep in range(args.repeats):
            order = ("seqrl", "trl") if rep % 2 == 0 else ("trl", "seqrl")
            for fw in order:
                job = base | {"algo": algo, "trl": trl_kwargs, "out": str(tmp / f"{fw}-{algo}-{rep}.json")}
                r = per_repeat(run_child(fw, job))
                results.setdefault((algo, fw), []).append(r)
                print(f"  repeat {rep} {fw:<5} {r['s_per_step']:.3f} s/step (CPU {r['cpu_s_per_step']:.3f})  "
                      f"{r['trained_tok_s']:6.0f} tok/s  {r['tokens_per_step']:.0f} tok/step  {r['rss_mib']:.0f} MiB")
    print(f"\nRL step, tiny_dense, {args.prompts} prompts x G={args.G}, {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s); min / median / max over {args.repeats} repeats of {args.steps} steps")
    cols = (("s_per_step", "wall s/step", 3), ("cpu_s_per_step", "CPU s/step", 3), ("gen_tok_s", "gen tok/s", 0),
            ("trained_tok_s", "trained tok/s", 0), ("rss_mib", "peak RSS MiB", 0))
    print(f"{'algo':<6}{'framework':<10}" + "".join(f"{title:>24}" for _, title, _ in cols))
    for algo in args.algos:
        for fw in FRAMEWORKS:
            reps = results[(algo, fw)]
            s = {k: summary([r[k] for r in reps]) for k in reps[0]}
            print(f"{algo:<6}{fw:<10}" + "".join(f"{fmt(s[key], d):>24}" for key, _, d in cols))
            record.add(kind="summary", algo=algo, framework=fw,
                       **{f"{k}_{stat}": s[k][stat] for k in s for stat in ("min", "median", "max")})
            for rep, r in enumerate(reps):
                record.add(kind="repeat", algo=algo, framework=fw, repeat=rep, **r)
        pairs = list(zip(results[(algo, "seqrl")], results[(algo, "trl")]))
        ratio = summary([a["trained_tok_s"] / b["trained_tok_s"] for a, b in pairs])
        cpu_ratio = summary([a["trained_tok_cpu_s"] / b["trained_tok_cpu_s"] for a, b in pairs])
        print(f"{algo:<6}{'seqrl/TRL':<10} trained tok/s x{fmt(ratio)} (wall), x{fmt(cpu_ratio)} (per CPU second); "
              "target >= 2")
        record.add(kind="ratio", algo=algo, framework="seqrl/trl", **{f"wall_ratio_{k}": v for k, v in ratio.items()},
                   **{f"cpu_ratio_{k}": v for k, v in cpu_ratio.items()})
    record.note("step = end of one step to the end of the next (loop and logging included), wall and the child's CPU "
                "time; warm-up steps untimed; each repeat of each framework in its own child process")
    record.write()


# -------------------------------------------------------------------------------------------------------- profile
# A profiled child reports phases: PHASES in _seqrl_side.py / _trl_side.py list (label, [(file suffix, function, caller
# or None)], inside STEP_FN?): the cumulative cProfile time of the functions (a caller: only the calls from it).
BACKWARD = [("torch/_tensor.py", "backward", None)]
OPTIMIZER = [("torch/optim/adam.py", "step", None), ("clip_grad.py", "clip_grad_norm_", None)]  # AdamW's step is Adam's


def cumulative(stats: dict, file: str, func: str, caller: str | None = None) -> float:
    """Summed cumulative seconds of the functions `func` in files ending with `file` (only calls from `caller`)."""
    total = 0.0
    for (path, _, name), (_, _, _, ct, callers) in stats.items():
        if name == func and path.endswith(file):
            total += ct if caller is None else sum(v[3] for (_, _, c), v in callers.items() if c == caller)
    return total


def breakdown(prof: str, phases: list, step_fn: tuple[str, str], wall: float, steps: int) -> list:
    """[(phase, seconds per step)] of one profiled child, plus what is left inside and outside the step function."""
    import pstats

    stats = pstats.Stats(prof).stats
    rows, inside, outside = [], 0.0, 0.0
    for label, matchers, within in phases:
        sec = sum(cumulative(stats, *m) for m in matchers)
        rows.append((label, sec / steps))
        inside, outside = (inside + sec, outside) if within else (inside, outside + sec)
    step_s = cumulative(stats, *step_fn)
    rows.append(("other, inside the step function", (step_s - inside) / steps))
    rows.append(("trainer loop outside the step function", (wall - step_s - outside) / steps))
    return rows


def profile_all(args, base: dict, tmp: Path) -> None:
    """One cProfiled child per framework and algorithm: seconds per step by phase (cProfile adds its own overhead,
    most to Python-heavy code such as a per-token decoding loop)."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    for algo in args.algos:
        _, c = compose_train(seqrl_overrides(base | {"algo": algo}))
        print(f"\n== {algo}: seconds per RL step by phase (cProfile, {args.steps} steps after {args.warmup} warm-up)")
        for fw in FRAMEWORKS:
            prof = out / f"{fw}_{algo}.prof"
            res = run_child(fw, base | {"algo": algo, "trl": matched(c)[0], "out": str(tmp / f"{fw}.json"),
                                        "profile": str(prof)})
            per_step = sum(res["step_s"]) / args.steps
            print(f"  {fw}: {per_step:.3f} s/step (profiled)   [{prof}]")
            for label, sec in res["phases"]:
                print(f"    {label:<42}{sec:8.3f} s {100 * sec / per_step:5.1f} %")


if __name__ == "__main__":
    main()
