"""Typed schemas for every config group, registered with Hydra's ConfigStore.

The root schema `TrainConfig` types each group, so a misspelt key or a wrong type fails when Hydra composes the
config; range and cross-field checks run in `validate()` (and in each dataclass's `__post_init__`), before any model
is built. `conf/train.yaml` and `conf/eval.yaml` name these schemas first in their defaults lists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from seqrl.algorithms.config import AlgorithmConfig

ANSWER_KINDS = ("math", "int", "number", "choice", "multi_choice")
FAMILIES = ("dense", "moe", "vl", "oracle")  # registry keys in seqrl.models (oracle: seqrl.eval.oracle)
IMAGE_FAMILIES = ("vl", "oracle")  # families that take images


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error every bad value gets: the key, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{key}={value!r}: {allowed}")


def _positive(key: str, value: float, note: str = "") -> None:
    """A strictly positive, finite float (nan and inf are refused with their own wording)."""
    _check(value > 0, key, value, "must be > 0" + note)
    _check(math.isfinite(value), key, value, "must be a finite number > 0" + note)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, key, value, "allowed: " + ", ".join(map(str, allowed)))


@dataclass
class ModelConfig:
    family: str = "dense"  # dense | moe | vl | oracle (registry key in seqrl.models; oracle = seqrl-eval only)
    name_or_path: Optional[str] = None  # HF id or local dir; None = random init from `arch`
    local_dir: Optional[str] = None  # overrides name_or_path (offline users, seqrl HF exports)
    tokenizer: str = "char"  # char = built in code; auto = the checkpoint's own
    arch: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _one_of("model.family", self.family, FAMILIES)
        _one_of("model.tokenizer", self.tokenizer, ("char", "auto"))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    name: str = "arith"
    source: str = "generated"  # generated | local | hf
    task: Optional[str] = None
    task_kwargs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None
    hf_id: Optional[str] = None
    hf_config: Optional[str] = None
    split: str = "train"
    fields: Dict[str, str] = field(default_factory=lambda: {"prompt": "question", "answer": "answer"})
    image_field: Optional[str] = None
    modality: str = "text"  # text | image (image items need model.family=vl)
    answer_kind: str = "int"
    prompt_template: str = "{prompt}"
    n_train: Optional[int] = None
    n_eval: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of(f"{self.name}.source", self.source, ("generated", "local", "hf"))
        _one_of(f"{self.name}.answer_kind", self.answer_kind, ANSWER_KINDS)
        _one_of(f"{self.name}.modality", self.modality, ("text", "image"))
        _check(self.n_eval >= 0, f"{self.name}.n_eval", self.n_eval, "must be >= 0")


@dataclass
class BenchmarkConfig(DataConfig):
    """A benchmark is a data source plus how to score it (lm-eval style: data + one scoring function)."""

    ks: List[int] = field(default_factory=lambda: [1])  # pass@k / maj@k values to report
    gold_map: Optional[str] = None  # per-record (gold, kind, verifier options): seqrl.eval.benchmarks.benchmark_gold
    hf_fields: Dict[str, str] = field(default_factory=dict)  # `fields` of the hub copy (empty: same as `fields`)
    hf_image_field: Optional[str] = None  # `image_field` of the hub copy
    verifier: Dict[str, Any] = field(default_factory=dict)  # default grade() options, e.g. timeout_s
    require_images: bool = True  # false: run an image benchmark text-only (images dropped)
    metrics: List[str] = field(default_factory=list)  # extra benchmark-level metrics, e.g. wemath_four_dim

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(all(k >= 1 for k in self.ks), f"eval.benchmarks.{self.name}.ks", self.ks, "every k must be >= 1")


@dataclass
class RolloutConfig:
    name: str = "standard"  # registry key in seqrl.algorithms.rollout: standard | eqlen
    engine: str = "hf"  # hf (seqrl's KV-cached loop) | hf_generate (transformers generate()) | vllm
    group_size: int = 8  # G responses per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eqlen_max_forks: int = 8  # EqLen: forks per prompt (0 = a pair's unit ends with its shorter track)
    eqlen_unpaired: str = "stop"  # EqLen, fork budget spent: stop (cut the longer track) | untrained
    # torch intra-op threads while the training rollout decodes (None = the run's `threads`); a step of one token per
    # row is little work to split: 1 can beat more on small batches while the update uses them all (tiny_dense at 64
    # rows decodes faster on 2 threads since the fused q|k|v and gate|up GEMMs: 71-77 vs 103-114 ms a rollout)
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, ("hf", "hf_generate", "vllm"))
        _check(self.threads is None or self.threads >= 1, "rollout.threads", self.threads, "must be >= 1 or null")
        _check(self.top_k >= 0, "rollout.top_k", self.top_k, "must be >= 0 (0 = off)")
        _check(self.eqlen_max_forks >= 0, "rollout.eqlen_max_forks", self.eqlen_max_forks, "must be >= 0")
        _one_of("rollout.eqlen_unpaired", self.eqlen_unpaired, ("stop", "untrained"))
        _check(self.group_size >= 1, "rollout.group_size", self.group_size, "must be >= 1")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _positive("rollout.temperature", self.temperature, " (sampling)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")


@dataclass
class EvalConfig:
    name: str = "smoke"
    benchmarks: Dict[str, BenchmarkConfig] = field(default_factory=dict)
    heldout: bool = True  # seqrl-train also scores the held-out split of its training data
    n_samples: int = 1  # k samples per item
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    every_n_steps: int = 0  # 0 = only at the end of training
    limit: Optional[int] = None  # cap items per benchmark
    grading_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "eval.n_samples", self.n_samples, "must be >= 1")
        _check(0 <= self.temperature < math.inf, "eval.temperature", self.temperature,
               "must be >= 0 and finite (0 = greedy)")
        _check(self.every_n_steps >= 0, "eval.every_n_steps", self.every_n_steps, "must be >= 0")
        _check(0 < self.top_p <= 1, "eval.top_p", self.top_p, "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "must be >= 1 or null (all items)")
        _check(self.grading_workers >= 0, "eval.grading_workers", self.grading_workers, "must be >= 0")
        for key, bench in self.benchmarks.items():  # the suite's key names the benchmark (metrics, errors)
            if isinstance(bench, BenchmarkConfig):
                bench.name = key


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0  # linear LR warm-up, in optimizer steps
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _check(0 <= self.weight_decay < math.inf, "optim.weight_decay", self.weight_decay, "must be >= 0 and finite")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
               "must be two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(not math.isnan(self.grad_clip), "optim.grad_clip", self.grad_clip, "must be a number (<= 0 = off)")


@dataclass
class WarmupConfig:
    """Supervised warm-up on a generated task's demonstrations, cached on disk keyed by its config."""

    enabled: bool = False
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    worked_frac: float = 0.5  # share of worked (long) vs direct (short) demonstrations
    seed: Optional[int] = None  # seed of the model init + warm-up; None = the run's seed (set it to share one warm-up)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "warmup.steps", self.steps, "must be >= 0")
        _check(self.batch_size >= 1, "warmup.batch_size", self.batch_size, "must be >= 1")
        _positive("warmup.lr", self.lr)
        _check(0 <= self.worked_frac <= 1, "warmup.worked_frac", self.worked_frac, "must be in [0, 1]")


@dataclass
class TrainerConfig:
    """Lightning Trainer kwargs; `max_steps` counts RL steps (rollouts), not optimizer steps."""

    _target_: str = "lightning.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Any = "32-true"
    max_steps: int = 20
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    num_sanity_val_steps: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "trainer.max_steps", self.max_steps, "must be >= 1")
        _check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "must be >= 1")
        d = self.devices
        _check(not isinstance(d, bool) and (d == -1 or d == "auto" or (isinstance(d, int) and d >= 1)
                                            or (isinstance(d, (str, list)) and d not in ("", "0", []))),
               "trainer.devices", d, "allowed: an integer >= 1, -1 (all), auto, or a non-empty list of device ids")

    @property
    def world_size(self) -> Optional[int]:
        """Data-parallel processes when `devices` is a plain count, else None (known only at run time)."""
        count = self.devices if isinstance(self.devices, int) and self.devices >= 1 else None
        return count * self.num_nodes if count is not None else None


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "../shared/benchmarks"
    cache_dir: str = "~/.cache/seqrl"
    output_dir: Optional[str] = None  # the Hydra run directory, filled in at run time


@dataclass
class TrainConfig:
    algorithm: AlgorithmConfig = MISSING
    rollout: RolloutConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: Dict[str, Any] = field(default_factory=dict)  # name -> Lightning logger kwargs with _target_
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads (None = torch's default); 1 for parallel CPU sweeps
    max_bad_steps: int = 3  # stop after this many consecutive RL steps skipped for NaN/inf values
    length_buckets: int = 1  # log-prob forwards per minibatch, rows grouped by length (exact; less padding)
    # rows per forward/backward inside a PPO minibatch (gradients accumulate, exact; null = the whole minibatch):
    # bounds the update's activation memory at one extra forward without a graph (RLModule._backward_in_parts)
    micro_batch_size: Optional[int] = None
    prompts_per_step: int = 8
    sample_table_every: int = 10  # log a W&B table of completions every N RL steps (0 = never)
    ckpt_path: Optional[str] = None  # resume from this Lightning checkpoint ("last" = the run dir's last.ckpt)
    task_name: str = "train"
    tags: List[str] = field(default_factory=list)


@dataclass
class EvalRunConfig:
    model: ModelConfig = MISSING
    eval: EvalConfig = MISSING
    data: Optional[DataConfig] = None  # with eval.heldout, its held-out split is scored too
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logger: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: Optional[str] = None  # a Lightning .ckpt or an HF export directory
    seed: int = 0
    task_name: str = "eval"
    tags: List[str] = field(default_factory=list)


def register_configs() -> None:
    """Register the schemas and the `${seqrl_root:}` resolver (the project root: conf/'s parent directory)."""
    from seqrl.cli import conf_dir

    OmegaConf.register_new_resolver("seqrl_root", lambda: str(conf_dir().parent), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)


def unknown_key(full_key: str, bad: str, known) -> str:
    """`key: unknown key (did you mean <closest>?); allowed: <the keys beside it>`."""
    import difflib

    known = sorted(known)
    near = difflib.get_close_matches(bad, known, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"{full_key}: unknown key{hint}; allowed: {', '.join(known) or 'none at this level'}"


def _no_extra_keys(node: DictConfig, obj: Any, prefix: str = "") -> None:
    """A key no schema field takes (added with `+key=value`, which the schema does not refuse) is one error line
    naming it, not a setting silently ignored. Free-form fields (dicts such as model.arch) take any key."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        fields = [f.name for f in dataclasses.fields(obj)]
        for key in node:
            if key not in fields:
                raise ValueError(unknown_key(f"{prefix}{key}", str(key), fields))
    children = vars(obj) if dataclasses.is_dataclass(obj) else obj if isinstance(obj, dict) else {}
    for key, value in children.items():
        child = node.get(key) if isinstance(node, DictConfig) else None
        if isinstance(child, DictConfig):
            _no_extra_keys(child, value, f"{prefix}{key}.")


def validate(cfg: DictConfig) -> Any:
    """Instantiate the schema dataclasses (running every `__post_init__` check) and the cross-group checks.

    Returns the typed object. Raises ValueError with one line naming the key, the value and what is allowed.
    """
    from seqrl.algorithms import ADVANTAGES  # registry of advantage estimators
    from seqrl.algorithms.rollout import ROLLOUTS  # registry of rollout modes (seqrl.algorithms registers eqlen)
    from seqrl.algorithms.vllm_engine import check_engine  # no vLLM import
    from seqrl.models import check_arch

    obj = OmegaConf.to_object(cfg)
    _no_extra_keys(cfg, obj)
    _one_of("rollout.name", obj.rollout.name, tuple(sorted(ROLLOUTS)))
    _check(obj.rollout.name == "standard" or obj.rollout.engine == "hf", "rollout.engine", obj.rollout.engine,
           f"rollout={obj.rollout.name} decodes with its own loop on the HF model; allowed: hf")
    check_engine(obj)  # rollout.engine=vllm needs CUDA
    check_arch(obj.model)  # a random-init model's arch against its transformers config class (no weights)
    if isinstance(obj, EvalRunConfig) and obj.checkpoint is not None:
        _check(Path(obj.checkpoint).expanduser().exists(), "checkpoint", obj.checkpoint,
               "no such file or directory; allowed: an HF export dir, a Lightning .ckpt file, or null (model=...)")
    if isinstance(obj, TrainConfig):
        _check(obj.prompts_per_step >= 1, "prompts_per_step", obj.prompts_per_step, "must be >= 1")
        world = obj.trainer.world_size or 1
        _check(obj.prompts_per_step % world == 0, "prompts_per_step", obj.prompts_per_step,
               f"the global batch is split over trainer.devices x num_nodes = {world} processes; "
               f"allowed: a multiple of {world}")
        rows = obj.prompts_per_step // world * obj.rollout.group_size
        _check(obj.algorithm.ppo_minibatches <= rows, "algorithm.ppo_minibatches", obj.algorithm.ppo_minibatches,
               f"each process has prompts_per_step/{world} x group_size = {rows} rollout rows; allowed: 1..{rows}")
        _check(obj.threads is None or obj.threads >= 1, "threads", obj.threads, "must be >= 1 or null")
        _check(obj.max_bad_steps >= 1, "max_bad_steps", obj.max_bad_steps, "must be >= 1")
        _check(obj.length_buckets >= 1, "length_buckets", obj.length_buckets, "must be >= 1")
        _check(obj.micro_batch_size is None or obj.micro_batch_size >= 1, "micro_batch_size", obj.micro_batch_size,
               "must be >= 1 or null (the whole minibatch)")
        if obj.algorithm.group_relative:
            _check(obj.rollout.group_size >= 2, "rollout.group_size", obj.rollout.group_size,
                   f"algorithm {obj.algorithm.name} uses a group-relative advantage "
                   f"({obj.algorithm.advantage}); allowed: >= 2")
        _one_of("algorithm.advantage", obj.algorithm.advantage, tuple(sorted(ADVANTAGES)))
        if obj.rollout.name == "eqlen":
            _check(obj.rollout.group_size >= 2 and obj.rollout.group_size % 2 == 0, "rollout.group_size",
                   obj.rollout.group_size, "rollout=eqlen decodes responses in pairs; allowed: an even number >= 2")
        _check(obj.model.family != "oracle", "model.family", "oracle",
               "the oracle only answers benchmarks (seqrl-eval model=oracle); train dense, moe or vl")
        if obj.warmup.enabled:
            _check(obj.data.source == "generated", "warmup.enabled", True,
                   f"needs a generated task with demonstrations (data.source={obj.data.source!r})")
    from seqrl.data import check_data_source
    from seqrl.eval.benchmarks import resolve_benchmark

    data_dir = str(Path(obj.paths.data_dir).expanduser())
    benchmarks = [resolve_benchmark(b, data_dir) for b in obj.eval.benchmarks.values()]  # local copy, else hub
    for b in [getattr(obj, "data", None), *benchmarks]:
        if b is None:
            continue
        if b.modality == "image":
            _check(obj.model.family in IMAGE_FAMILIES, f"{b.name}.modality", "image",
                   f"needs a vision-language model (model.family=vl), got model.family={obj.model.family}")
        check_data_source(b, data_dir)
    return obj
