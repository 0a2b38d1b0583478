"""Prompt data: generated tasks (arith_chain, image_count), local prompt sets (GSM8K from the shared copy), errors."""
from __future__ import annotations

import json
import random
import re
import string
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import DATA_DIR as BENCHMARKS
from seqrl.config import DataConfig
from seqrl.data import PromptDataset, check_data_source, load_samples, normalize_answer
from seqrl.tasks import COLORS, Sample, build_task, parse_steps, response_style

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str(BENCHMARKS)
GSM8K = Path(DATA_DIR) / "gsm8k" / "train.jsonl"


def make_cfg(yaml_name: str | None = None, **overrides) -> DataConfig:
    """A DataConfig as Hydra builds it: schema defaults <- conf/data/<yaml_name>.yaml <- overrides."""
    parts = [OmegaConf.structured(DataConfig)]
    if yaml_name:
        parts.append(OmegaConf.load(ROOT / "conf" / "data" / f"{yaml_name}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(*parts, OmegaConf.create(overrides)))


def chain_value(prompt: str) -> tuple[list, int]:
    """Parse "Compute 7+5-3+8." independently of the generator: (tokens, value)."""
    chain = re.fullmatch(r"Compute (\d+(?:[+-]\d+)+)\.", prompt).group(1)
    tokens = re.findall(r"[+-]?\d+", chain)
    return tokens, sum(int(t) for t in tokens)


# ------------------------------------------------------------------------------------------------ arith_chain
def test_arith_worked_demonstration_hand_example():
    task = build_task("arith_chain")
    s = Sample(prompt="Compute 7+5-3+8.", answer="17", kind="int",
               meta={"terms": [7, 5, 3, 8], "ops": ["+", "-", "+"], "partials": [12, 9, 17]})
    assert task.demonstration(s, "worked") == "7+5=12\n12-3=9\n9+8=17\n\\boxed{17}"
    assert task.demonstration(s, "direct") == "\\boxed{17}"
    assert response_style("7+5=12\n12-3=9\n9+8=17\n\\boxed{17}") == "worked"
    assert response_style("\\boxed{17}") == "direct"
    with pytest.raises(ValueError, match="style='long'.*worked, direct"):
        task.demonstration(s, "long")


def test_arith_demonstrations_recompute_and_fit_the_char_model():
    cfg = make_cfg("arith", n_train=400)
    task = build_task(cfg.task, **cfg.task_kwargs)
    printable = set(string.printable)
    for s in load_samples(cfg, "train", DATA_DIR):
        tokens, value = chain_value(s.prompt)
        assert 3 <= len(tokens) <= 5 and all(1 <= abs(int(t)) <= 9 for t in tokens)
        assert s.answer == str(value) and s.kind == "int"
        worked, direct = task.demonstration(s, "worked"), task.demonstration(s, "direct")
        steps = parse_steps(worked)
        assert len(steps) == len(tokens) - 1
        left = int(tokens[0])
        for (a, op, b, c), tok in zip(steps, tokens[1:]):
            assert a == left and op + str(b) == (tok if tok[0] in "+-" else "+" + tok)
            assert c == (a + b if op == "+" else a - b) and c >= 0  # partial results stay non-negative
            left = c
        assert worked.endswith(f"\n\\boxed{{{value}}}") and direct == f"\\boxed{{{value}}}"
        assert response_style(worked) == "worked" and response_style(direct) == "direct"
        assert len(worked) > len(direct) and len(s.prompt) < 40 and len(worked) < 60
        assert set(s.prompt + worked + s.answer) <= printable


def test_arith_deterministic_and_seed_dependent():
    prompts = lambda cfg, split: [s.prompt for s in load_samples(cfg, split, DATA_DIR)]  # noqa: E731
    a, b = make_cfg("arith", n_train=50), make_cfg("arith", n_train=50)
    assert prompts(a, "train") == prompts(b, "train") and prompts(a, "eval") == prompts(b, "eval")
    assert prompts(make_cfg("arith", n_train=50, seed=1), "train") != prompts(a, "train")
    # the held-out split does not depend on how many train prompts are asked for
    assert prompts(make_cfg("arith", n_train=5), "eval") == prompts(make_cfg("arith", n_train=500), "eval")


def test_arith_train_and_eval_disjoint_even_when_train_covers_the_space():
    # 3 terms of 1-3, "+" only: 27 distinct prompts. 2000 train draws would hit every one, eval's included.
    cfg = make_cfg("arith", task_kwargs={"n_terms": 3, "max_operand": 3, "ops": "+"}, n_train=2000, n_eval=7)
    train, held_out = load_samples(cfg, "train", DATA_DIR), load_samples(cfg, "eval", DATA_DIR)
    eval_prompts = {s.prompt for s in held_out}
    assert len(eval_prompts) == 7 and len(train) == 2000
    assert not eval_prompts & {s.prompt for s in train}
    assert len({s.prompt for s in train}) == 27 - 7
    assert [s.prompt for s in load_samples(cfg, "all", DATA_DIR)] == [s.prompt for s in train + held_out]
    with pytest.raises(ValueError, match="too few distinct prompts"):
        load_samples(make_cfg("arith", task_kwargs={"n_terms": 2, "max_operand": 2, "ops": "+"}), "eval", DATA_DIR)


def test_arith_task_kwargs_respected():
    cfg = make_cfg("arith", task_kwargs={"n_terms": [2, 2], "max_operand": 5, "ops": "+"}, n_train=100,
                   n_eval=5)
    for s in load_samples(cfg, "train", DATA_DIR):
        tokens, value = chain_value(s.prompt)
        assert len(tokens) == 2 and "-" not in s.prompt and all(1 <= int(t) <= 5 for t in tokens)
    fixed = make_cfg("arith", task_kwargs={"n_terms": 6, "min_operand": 10, "max_operand": 20}, n_train=50,
                     n_eval=5)
    lengths = {len(chain_value(s.prompt)[0]) for s in load_samples(fixed, "train", DATA_DIR)}
    assert lengths == {6}
    neg = build_task("arith_chain", ops="-", allow_negative=True)
    rng = random.Random(0)
    assert any(int(neg.sample(rng).answer) < 0 for _ in range(50))
    with pytest.raises(ValueError, match="ops='-': needs '\\+'"):
        build_task("arith_chain", ops="-")
    with pytest.raises(ValueError, match="n_terms=\\[4, 2\\]"):
        build_task("arith_chain", n_terms=[4, 2])
    with pytest.raises(ValueError, match="unknown key\\(s\\) terms for task arith_chain; allowed: n_terms"):
        check_data_source(make_cfg("arith", task_kwargs={"terms": 3}), DATA_DIR)


# ------------------------------------------------------------------------------------------------ image_count
def blobs(img: Image.Image) -> list:
    """Colours of the 4-connected non-white components of `img`, found by flood fill."""
    px = np.asarray(img)
    todo = ~(px == 255).all(-1)
    found = []
    for y0, x0 in zip(*np.nonzero(todo)):
        if not todo[y0, x0]:
            continue
        found.append(tuple(px[y0, x0]))
        todo[y0, x0] = False
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < px.shape[0] and 0 <= nx < px.shape[1] and todo[ny, nx]:
                    todo[ny, nx] = False
                    queue.append((ny, nx))
    return found


def test_image_count_answers_match_the_pixels():
    cfg = make_cfg("image_count", task_kwargs={"question": "mixed"}, n_train=40)
    task = build_task(cfg.task, **cfg.task_kwargs)
    samples = load_samples(cfg, "train", DATA_DIR)
    assert {s.meta["color"] is None for s in samples} == {True, False}  # both question kinds occur
    for s in samples:
        (img,) = s.images
        assert isinstance(img, Image.Image) and img.size == (112, 112) and img.mode == "RGB"
        colours = blobs(img)
        assert 1 <= len(colours) <= 6 and len(colours) == len(s.meta["shapes"])
        color = s.meta["color"]
        expected = len(colours) if color is None else colours.count(COLORS[color])
        assert s.answer == str(expected) and expected >= 1
        assert s.prompt == f"How many {color + ' ' if color else ''}shapes are in the image?"
        worked = task.demonstration(s, "worked")
        assert worked.endswith(f"so {expected} {color + ' ' if color else ''}shape{'s' * (expected > 1)}. "
                               f"\\boxed{{{expected}}}")
        assert worked.count(",") == expected and task.demonstration(s, "direct") == f"\\boxed{{{expected}}}"


def test_image_count_deterministic_and_disjoint():
    cfg = make_cfg("image_count", n_train=30, n_eval=10)
    first, second = load_samples(cfg, "train", DATA_DIR), load_samples(cfg, "train", DATA_DIR)
    assert [s.images[0].tobytes() for s in first] == [s.images[0].tobytes() for s in second]
    assert [s.answer for s in first] == [s.answer for s in second]
    eval_keys = {s.meta["key"] for s in load_samples(cfg, "eval", DATA_DIR)}
    assert len(eval_keys) == 10 and not eval_keys & {s.meta["key"] for s in first}
    with pytest.raises(ValueError, match="max_shapes=20"):
        build_task("image_count", max_shapes=20)


# ------------------------------------------------------------------------------------------ local prompt sets
def test_gsm8k_local_copy():
    cfg = make_cfg("gsm8k")
    raw = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    train, held_out = load_samples(cfg, "train", DATA_DIR), load_samples(cfg, "eval", DATA_DIR)
    assert len(raw) == 7473 and len(held_out) == 128 and len(train) == 7473 - 128
    assert train[0].prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0].prompt.endswith("?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert [s.answer for s in train[:3]] == ["72", "10", "5"] and held_out[-1].answer == "50"
    assert held_out[0].prompt.startswith(raw[7473 - 128]["question"])
    i = next(i for i, r in enumerate(raw) if r["answer"].endswith("#### 1,080"))
    assert train[i].answer == "1080" and all(s.kind == "number" for s in train)
    assert all(re.fullmatch(r"-?\d+", s.answer) for s in train + held_out)
    capped = load_samples(make_cfg("gsm8k", n_train=10), "train", DATA_DIR)
    assert [s.prompt for s in capped] == [s.prompt for s in train[:10]]
    assert len(load_samples(make_cfg("gsm8k", n_train=10), "all", DATA_DIR)) == 10
    with pytest.raises(ValueError, match="n_eval=7473: must be < the 7473 distinct records"):
        load_samples(make_cfg("gsm8k", n_eval=7473), "eval", DATA_DIR)


def test_nested_fields_regex_dedup_and_dict_json(tmp_path):
    wrap = ("Solve the following math problem step by step. The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\nRemember to put "
            "your answer on its own line after \"Answer:\".")
    rows = [{"prompt": [{"role": "user", "content": wrap.format(f"What is {k}+{k}?")}],
             "reward_model": {"ground_truth": str(2 * k), "style": "rule"}} for k in (1, 2, 3, 1, 2)]
    (tmp_path / "dapo.jsonl").write_text("\n".join(map(json.dumps, rows)))
    cfg = make_cfg("dapo_math_17k", source="local", path="dapo.jsonl", n_eval=1)
    train, held_out = load_samples(cfg, "train", str(tmp_path)), load_samples(cfg, "eval", str(tmp_path))
    assert [s.prompt.split("\n")[0] for s in train + held_out] == ["What is 1+1?", "What is 2+2?", "What is 3+3?"]
    assert [s.answer for s in train + held_out] == ["2", "4", "6"]  # duplicates dropped, order kept
    assert len(load_samples(cfg, "all", str(tmp_path))) == 5  # "all" keeps every record
    (tmp_path / "bench.json").write_text(json.dumps({"q1": {"question": "2 + 2?", "answer": 4.0, "unit": "cm"}}))
    tmpl = make_cfg(source="local", path="bench.json", prompt_template="{prompt} [{unit}]", n_eval=0)
    (s,) = load_samples(tmpl, "all", str(tmp_path))
    assert (s.prompt, s.answer, s.meta["record"]["_key"]) == ("2 + 2? [cm]", "4", "q1")
    assert normalize_answer("1,234,567", "int") == "1234567" and normalize_answer("1,2", "math") == "1,2"
    with pytest.raises(ValueError, match="fields.answer='gold': not found in record 0"):
        load_samples(make_cfg(source="local", path="bench.json", fields={"answer": "gold"}), "all", str(tmp_path))
    with pytest.raises(ValueError, match="prompt_template='\\{prompt\\} \\{nope\\}': bad field 'nope'"):
        load_samples(make_cfg(source="local", path="bench.json", prompt_template="{prompt} {nope}"), "all",
                     str(tmp_path))


def test_image_paths_open_lazily_in_the_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 10), (0, 0, 255)).save(tmp_path / "images" / "a-0.png")
    rows = [{"question": "<image>\nWhat colour?", "answer": "\\boxed{blue}", "image": ["images/a-0.png"]}]
    (tmp_path / "virl.jsonl").write_text(json.dumps(rows[0]))
    cfg = make_cfg("virl39k", path=str(tmp_path / "virl.jsonl"), n_eval=0)
    (s,) = load_samples(cfg, "all", "/nonexistent")  # an absolute path ignores data_dir
    assert s.images is None and s.meta["image_paths"] == [str(tmp_path / "images" / "a-0.png")]
    assert (s.prompt.split("\n")[0], s.answer, s.kind) == ("What colour?", "blue", "math")
    ds = PromptDataset([s])
    (item,) = ds.collate([ds[0]])
    assert item.images[0].size == (20, 10) and item.images[0].getpixel((3, 3)) == (0, 0, 255)
    (tmp_path / "images" / "a-0.png").unlink()
    with pytest.raises(ValueError, match="a-0.png: file not found"):
        ds[0]


# ------------------------------------------------------------------------------------------------------ errors
def test_configs_compose_and_pass_the_source_check():
    for path in sorted((ROOT / "conf" / "data").glob("*.yaml")):
        cfg = make_cfg(path.stem)
        assert cfg.name == path.stem
        check_data_source(cfg, DATA_DIR)  # hub sets only need an id here; nothing is downloaded


def test_bad_sources_fail_with_one_line():
    with pytest.raises(ValueError) as e:
        load_samples(make_cfg("gsm8k", path="gsm8k/missing.jsonl"), "train", DATA_DIR)
    assert str(e.value).startswith("data.path=gsm8k/missing.jsonl: file not found; looked for ")
    assert "\n" not in str(e.value) and str(Path(DATA_DIR) / "gsm8k" / "missing.jsonl") in str(e.value)
    with pytest.raises(ValueError, match=r"^data.task='arith': unknown task; allowed: arith_chain, image_count"):
        check_data_source(make_cfg("arith", task="arith"), DATA_DIR)
    with pytest.raises(ValueError, match="source 'local' needs a file path"):
        check_data_source(make_cfg(source="local"), DATA_DIR)
    with pytest.raises(ValueError, match="source 'hf' needs a dataset id"):
        check_data_source(make_cfg(source="hf"), DATA_DIR)
    with pytest.raises(ValueError, match="split='test': allowed: train, eval, all"):
        load_samples(make_cfg("arith"), "test", DATA_DIR)
