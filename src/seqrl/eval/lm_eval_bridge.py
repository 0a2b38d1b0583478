"""lm-eval bridge: seqrl's text benchmarks as lm-evaluation-harness tasks, scored by seqrl's own grader.

    python -m seqrl.eval.lm_eval_bridge eval=math out=lm_eval_tasks          # any seqrl-eval overrides work
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=outputs/train/<date>/<time>/hf --include_path lm_eval_tasks \\
        --tasks seqrl_math --apply_chat_template --batch_size 8      # or --tasks seqrl_aime24,seqrl_math500

`write_tasks` loads every benchmark of the suite exactly as seqrl-eval does (local copy first, gold mapping,
prompt template, `eval.limit`) and writes, into the output folder:
- <name>.jsonl: one doc per item: prompt (template applied), gold, kind, grade_kw (JSON: the verifier options);
- seqrl_<name>.yaml: a `generate_until` task over that file (`dataset_path: json`, so it runs offline), greedy,
  `max_gen_toks` = eval.max_new_tokens, stopping at the model's EOS only, tagged `seqrl_<suite>`;
- seqrl_lm_eval_hooks.py: the `process_results` hook, which calls `seqrl.eval.grading.grade`.
So on the same completions lm-eval's `acc` equals seqrl-eval's avg@1. With `--apply_chat_template` lm-eval wraps
the prompt in the checkpoint's chat template as seqrl's `Policy.encode_prompts` does. Image benchmarks are refused
(lm-eval's `hf` model takes no images).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from seqrl.eval.benchmarks import load_benchmark, resolve_benchmark
from seqrl.eval.grading import grade

HOOKS = "seqrl_lm_eval_hooks"
_HOOK_MODULE = '''"""Written by seqrl.eval.lm_eval_bridge: lm-eval scores seqrl tasks with seqrl's grader."""
from seqrl.eval.lm_eval_bridge import process_results  # noqa: F401
'''
_TASK_YAML = """# Written by seqrl.eval.lm_eval_bridge from the seqrl benchmark config `{name}` (suite {suite}).
task: seqrl_{name}
tag: seqrl_{suite}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: gold
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_gen_toks}
process_results: !function {hooks}.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: {"acc": 1.0 | 0.0} for the completion results[0], graded as seqrl grades it."""
    return {"acc": float(grade(results[0], doc["gold"], doc["kind"], **json.loads(doc["grade_kw"])))}


def task_docs(samples: list) -> list[dict]:
    """The lm-eval docs of a benchmark's samples (the grade options as a JSON string: one Arrow type per column)."""
    return [{"prompt": s.prompt, "gold": s.answer, "kind": s.kind, "grade_kw": json.dumps(s.meta.get("grade_kw") or {}),
             "index": int(s.meta.get("index", i))} for i, s in enumerate(samples)]


def write_tasks(eval_cfg, data_dir: str, out_dir: str | Path) -> list[str]:
    """Write the lm-eval task folder for every benchmark of `eval_cfg` (an EvalConfig); returns the task names
    (seqrl_<benchmark>; the tag seqrl_<suite name> selects them all). Raises ValueError for an image benchmark."""
    from seqrl.results import write_jsonl_atomic, write_text_atomic

    out = Path(out_dir).expanduser().resolve()
    for name, bench in eval_cfg.benchmarks.items():
        if resolve_benchmark(bench, data_dir).modality != "text":
            raise ValueError(f"eval.benchmarks.{name}: modality=image; the lm-eval bridge exposes text benchmarks "
                             f"only (allowed: a suite such as eval=math)")
    write_text_atomic(out / f"{HOOKS}.py", _HOOK_MODULE)
    names = []
    for name, bench in eval_cfg.benchmarks.items():
        data_file = out / f"{name}.jsonl"
        write_jsonl_atomic(data_file, task_docs(load_benchmark(bench, data_dir, limit=eval_cfg.limit)))
        write_text_atomic(out / f"seqrl_{name}.yaml", _TASK_YAML.format(
            name=name, suite=eval_cfg.name, data_file=json.dumps(str(data_file)), hooks=HOOKS,
            max_gen_toks=eval_cfg.max_new_tokens))
        names.append(f"seqrl_{name}")
    return names


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m seqrl.eval.lm_eval_bridge [out=DIR] [seqrl-eval overrides such as eval=math]`."""
    from hydra import compose, initialize_config_dir

    from seqrl.cli import conf_dir
    from seqrl.config import register_configs, validate

    argv = list(sys.argv[1:] if argv is None else argv)
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "lm_eval_tasks")
    overrides = [a for a in argv if not a.startswith("out=")]
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            suite = [] if any(a.startswith("eval=") for a in overrides) else ["eval=math"]
            c = validate(compose(config_name="eval", overrides=[*suite, *overrides]))
        names = write_tasks(c.eval, str(Path(c.paths.data_dir).expanduser()), out)
    except ValueError as exc:
        print(f"seqrl lm-eval bridge: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(names)} lm-eval tasks to {out}: {', '.join(names)} (tag seqrl_{c.eval.name})\n"
          f"run: lm_eval --model hf --model_args pretrained=<seqrl HF export dir> --include_path {out} "
          f"--tasks seqrl_{c.eval.name} --apply_chat_template", flush=True)


if __name__ == "__main__":
    main()
