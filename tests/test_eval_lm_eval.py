"""lm-eval bridge: generated task folders run in lm-eval offline and score exactly as seqrl-eval does, both on
identical scripted completions and on greedy generations of a tiny HF export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose
from seqrl.config import validate
from seqrl.eval.harness import build_eval_sets, evaluate_rollout, generate_for_eval
from seqrl.eval.lm_eval_bridge import main, process_results, write_tasks

TASKS = ["seqrl_aime24", "seqrl_aime25", "seqrl_math500", "seqrl_amc23"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only spin on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The math suite (8 items each, greedy, 12 new tokens) as seqrl sees it, and its lm-eval task folder."""
    c = validate(compose("eval", ["eval=math", "eval.limit=8", "eval.n_samples=1", "eval.temperature=0",
                                  "eval.max_new_tokens=12"]))
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    assert write_tasks(c.eval, c.paths.data_dir, out) == TASKS
    return c, out


def scripted(i: int, gold: str) -> str:
    """Completions of four shapes: boxed gold, 'answer is' gold, a wrong boxed number, no answer at all."""
    return [f"Thus \\boxed{{{gold}}}.", f"So the answer is {gold}", "\\boxed{-98765}", "I am not sure."][i % 4]


def lm_eval_run(model, out: Path, tasks: list[str], **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(out)),
                           log_samples=True, **kw)


def test_task_folder_contents(suite):
    c, out = suite
    yaml_text = (out / "seqrl_math500.yaml").read_text()
    assert "dataset_path: json" in yaml_text and "tag: seqrl_math" in yaml_text and "max_gen_toks: 12" in yaml_text
    assert "process_results: !function seqrl_lm_eval_hooks.process_results" in yaml_text
    docs = [json.loads(x) for x in (out / "amc23.jsonl").read_text().splitlines()]
    assert len(docs) == 8 and docs[0]["gold"] == "27" and json.loads(docs[0]["grade_kw"]) == {"timeout_s": 2.0}
    assert process_results(docs[0], ["\\boxed{27.0}"]) == {"acc": 1.0}
    assert process_results(docs[0], ["\\boxed{28}"]) == {"acc": 0.0}


def test_bridge_refuses_image_benchmarks_and_cli_writes(tmp_path, capsys):
    c = validate(compose("eval", ["eval=vision", "model=tiny_vl"]))
    with pytest.raises(ValueError, match="eval.benchmarks.mathvista: modality=image"):
        write_tasks(c.eval, c.paths.data_dir, tmp_path / "x")
    main([f"out={tmp_path / 'cli'}", "eval.limit=2", "~eval.benchmarks.math500"])
    assert "tag seqrl_math" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.yaml")) == [
        "seqrl_aime24.yaml", "seqrl_aime25.yaml", "seqrl_amc23.yaml"]


def test_same_completions_same_accuracy(suite):
    """lm-eval (its evaluator, the generated YAML, the process_results hook, mean aggregation) and seqrl-eval's
    grading (evaluate_rollout) agree item by item on identical completions."""
    from lm_eval.api.model import LM

    from seqrl.algorithms.rollout import rollout_from_texts
    from seqrl.models import build_policy

    c, out = suite
    policy = build_policy(c.model)
    ours, completion = {}, {}
    for es in build_eval_sets(c.eval, c.data, c.paths.data_dir):
        texts = [scripted(i, s.answer) for i, s in enumerate(es.samples)]
        completion.update({s.prompt: t for s, t in zip(es.samples, texts)})
        result = evaluate_rollout(es, [rollout_from_texts(policy, es.samples, texts)], c.eval)
        ours[f"seqrl_{es.name}"] = result

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [completion[r.args[0]] for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        loglikelihood_rolling = loglikelihood

    theirs = lm_eval_run(Scripted(), out, TASKS)
    for task in TASKS:
        per_doc = [s["acc"] for s in sorted(theirs["samples"][task], key=lambda s: s["doc_id"])]
        assert per_doc == [float(r["correct"]) for r in ours[task]["records"]], task
        assert theirs["results"][task]["acc,none"] == pytest.approx(ours[task]["metrics"]["avg@1"])
        assert 0.25 <= ours[task]["metrics"]["avg@1"] <= 0.5  # two shapes right, two wrong (one may be ambiguous)


def test_lm_eval_hf_model_on_a_tiny_export_matches_seqrl_greedy(suite, tmp_path):
    """The documented command's path (`--model hf --model_args pretrained=<export> --apply_chat_template`),
    through the evaluator API: same greedy completions and the same accuracy as seqrl-eval on the same items."""
    from seqrl.evaluate import load_policy
    from seqrl.models import build_policy

    c, out = suite
    torch.manual_seed(0)
    policy = build_policy(c.model)
    with torch.no_grad():  # larger random weights: greedy text that depends on the prompt, not one repeated token
        for p in policy.model.parameters():
            p.normal_(0.0, 0.3)
    policy.save(str(tmp_path / "hf"))
    c.checkpoint = str(tmp_path / "hf")
    es = next(s for s in build_eval_sets(c.eval, c.data, c.paths.data_dir) if s.name == "aime25")
    es.samples = es.samples[:2]
    ours = evaluate_rollout(es, [generate_for_eval(load_policy(c), es.samples, c.eval)], c.eval)
    theirs = lm_eval_run("hf", out, ["seqrl_aime25"], model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                         limit=2, batch_size=2, apply_chat_template=True, device="cpu")
    samples = sorted(theirs["samples"]["seqrl_aime25"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [r["completion"] for r in ours["records"]]
    assert len({r["completion"] for r in ours["records"]}) == 2  # prompt-dependent text, so the match means something
    assert [s["acc"] for s in samples] == [float(r["correct"]) for r in ours["records"]]
    assert theirs["results"]["seqrl_aime25"]["acc,none"] == pytest.approx(ours["metrics"]["avg@1"])
