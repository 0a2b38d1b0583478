"""rollout.engine=vllm on the CPU: seqrl never imports vLLM; the missing-vLLM error; the config precheck; and the
adapter end to end against a test double of `vllm` (greedy HF decoding of the engine's own copy of the export, a
recording `load_weights`), compared with the HF engine on tiny_dense / tiny_vl. Real vLLM runs only in tests/gpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import DATA_DIR, ROOT, compose
from seqrl.algorithms import vllm_engine
from seqrl.algorithms.rollout import hf_generate, response_logprobs
from seqrl.algorithms.vllm_engine import (MISSING_VLLM, check_engine, hf_named_weights, release_engine,
                                          vllm_generate)
from seqrl.config import DataConfig, RolloutConfig
from seqrl.data import load_samples
from seqrl.models import Policy, build_policy

FAMILY = {"qwen3": "dense", "qwen3_moe": "moe", "qwen2_5_vl": "vl"}


# ------------------------------------------------------------------------------------------ the vllm test double
class FakeSamplingParams:
    """The SamplingParams fields the adapter may use (an unknown keyword is a TypeError, as a typo would be)."""

    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, stop_token_ids=None,
                 detokenize=True, logit_bias=None, logprobs=None, seed=None):
        if not (top_k in (0, -1) or top_k >= 1) or temperature < 0:
            raise ValueError(f"bad sampling params top_k={top_k} temperature={temperature}")
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})


class FakeModel:
    """vLLM's model object: load_weights takes (name, tensor) pairs named as in the HF checkpoint."""

    def __init__(self, hf_model):
        self.hf, self.pushes, self.unmatched = hf_model, [], set()

    @torch.no_grad()
    def load_weights(self, weights):
        pushed = {name: tensor.detach().clone() for name, tensor in weights}
        own = self.hf.state_dict()
        self.unmatched |= set(pushed) - set(own)
        for name, tensor in pushed.items():
            if name in own:
                own[name].copy_(tensor)
        self.pushes.append(pushed)


class FakeLLM:
    """Loads the export like vLLM would, and decodes all requests as one left-padded HF batch."""

    instances: list = []
    drop_stop_token = False  # True: token_ids leave out the stop token (the adapter must put it back)

    def __init__(self, model, tokenizer=None, **kwargs):
        self.kwargs = {"model": model, "tokenizer": tokenizer, **kwargs}
        model_type = json.loads((Path(model) / "config.json").read_text())["model_type"]
        self.policy = build_policy({"family": FAMILY[model_type], "local_dir": model, "tokenizer": "auto"})
        runner = SimpleNamespace(model=FakeModel(self.policy.model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=runner)))
        self.model, self.resets, self.calls = runner.model, 0, []
        FakeLLM.instances.append(self)

    def reset_prefix_cache(self):
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        sp, pad = sampling_params, self.policy.pad_token_id
        self.calls.append((prompts, sp))
        P = max(len(p["prompt_token_ids"]) for p in prompts)
        ids = torch.tensor([[pad] * (P - len(p["prompt_token_ids"])) + p["prompt_token_ids"] for p in prompts])
        extra = {}
        per_prompt = [p.get("multi_modal_data", {}).get("image", []) for p in prompts]
        images = [im for ims in per_prompt for im in (ims if isinstance(ims, list) else [ims])]
        if images:
            pix = self.policy.processor.image_processor(images=images, return_tensors="pt")
            extra = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"],
                     "mm_token_type_ids": (ids == self.policy.model.config.image_token_id).long()}
        sampling = dict(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k) \
            if sp.temperature > 0 else dict(do_sample=False)
        out = self.policy.model.generate(input_ids=ids, attention_mask=(ids != pad).long(), **extra, **sampling,
                                         max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids,
                                         pad_token_id=pad)[:, P:]
        return [self._output(p, row.tolist(), sp.stop_token_ids) for p, row in zip(prompts, out)]

    def _output(self, prompt, tokens, stops):
        ends = [i for i, t in enumerate(tokens) if t in stops]
        reason, stop_reason = "length", None
        if ends:
            tokens, reason = tokens[: ends[0] + 1], "stop"
            stop_reason = None if tokens[-1] == self.policy.eos_token_id else tokens[-1]
            tokens = tokens[:-1] if self.drop_stop_token else tokens
        done = SimpleNamespace(token_ids=tokens, finish_reason=reason, stop_reason=stop_reason, logprobs=None)
        return SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[done])


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    saved_env = dict(os.environ)
    yield module
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture
def make_policy():
    made = []

    def make(name: str) -> Policy:
        cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
        decoder = cfg.arch.text_config if "text_config" in cfg.arch else cfg.arch
        decoder.initializer_range = 0.2  # 10x the default: greedy decoding varies instead of repeating one token
        torch.manual_seed(0)
        made.append(build_policy(cfg))
        return made[-1]

    yield make
    for policy in made:
        release_engine(policy)


def samples_of(data: str, k: int) -> list:
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / f"{data}.yaml"))
    cfg.n_train = k
    return load_samples(OmegaConf.to_object(cfg), "train", str(DATA_DIR))[:k]


CFG = RolloutConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=20)


def assert_same_rollout(a, b):
    for key in ("input_ids", "attention_mask", "response_mask", "group_ids", "truncated"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.prompt_len == b.prompt_len and a.texts == b.texts and a.samples == b.samples
    assert a.mm.keys() == b.mm.keys() and all(torch.equal(a.mm[k], b.mm[k]) for k in a.mm)


# ------------------------------------------------------------------------------------------------------ imports
def test_importing_every_seqrl_module_never_imports_vllm(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")  # an importable vllm: any import of it would show
    script = ("import importlib, importlib.util, pkgutil, sys, seqrl\n"
              "names = [m.name for m in pkgutil.walk_packages(seqrl.__path__, 'seqrl.')]\n"
              "[importlib.import_module(n) for n in names]\n"
              "print(importlib.util.find_spec('vllm') is not None, 'vllm' in sys.modules, ' '.join(names))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    findable, imported, names = out.stdout.split(" ", 2)
    assert findable == "True" and imported == "False"
    assert "seqrl.algorithms.vllm_engine" in names.split() and "seqrl.train" in names.split()


def test_missing_vllm_is_a_one_line_error_before_any_export(monkeypatch, make_policy):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if it were not installed
    policy = make_policy("tiny_dense")
    with pytest.raises(ImportError) as err:
        vllm_generate(policy, samples_of("arith", 1), CFG, n=2)
    assert str(err.value) == MISSING_VLLM and "\n" not in str(err.value)
    assert not hasattr(policy, vllm_engine.ENGINE_ATTR)


def test_check_engine_needs_a_cuda_accelerator():
    with pytest.raises(ValueError, match=r"rollout\.engine=vllm .*trainer\.accelerator='cpu'.*rollout\.engine=hf"):
        check_engine(compose("train", ["trainer=cpu", "rollout.engine=vllm"]))
    check_engine(compose("train", ["trainer=gpu", "rollout.engine=vllm"]))
    check_engine(compose("train", ["trainer=cpu", "rollout.engine=hf"]))
    with pytest.raises(ValueError, match=r"not rollout=eqlen; allowed: rollout=standard, or rollout\.engine=hf"):
        check_engine(compose("train", ["trainer=gpu", "rollout=eqlen", "rollout.engine=vllm"]))
    check_engine(SimpleNamespace(rollout=SimpleNamespace(engine="vllm", name="standard")))  # seqrl-eval: no trainer


# --------------------------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe", "tiny_vl"])
def test_pushed_weights_are_the_exported_checkpoint(name, make_policy, tmp_path):
    policy = make_policy(name)
    policy.save(str(tmp_path))
    disk = load_file(str(tmp_path / "model.safetensors"))  # the names and tensors vLLM loads at start-up
    pushed = hf_named_weights(policy.model)
    assert pushed.keys() == disk.keys() and all(torch.equal(pushed[k], disk[k]) for k in disk)


@pytest.mark.parametrize("drop_stop_token", [False, True])
def test_greedy_rollout_is_the_hf_engine_rollout(drop_stop_token, fake_vllm, make_policy, monkeypatch):
    monkeypatch.setattr(FakeLLM, "drop_stop_token", drop_stop_token)
    policy, samples = make_policy("tiny_dense"), samples_of("arith", 3)
    first = hf_generate(policy, samples, CFG, n=2, greedy=True)
    extra_stop = int(first.responses.flatten().mode().values)  # the most frequent token: varied response lengths
    policy.model.generation_config.eos_token_id = [policy.eos_token_id, extra_stop]
    hf = hf_generate(policy, samples, CFG, n=2, greedy=True)
    ours = vllm_generate(policy, samples, CFG, n=2, greedy=True)
    assert_same_rollout(ours, hf)
    assert len(set(hf.lengths.tolist())) > 1 and not hf.truncated.all()  # stopped rows of different lengths
    assert ours.gen_seconds > 0 and ours.metrics["perf/weight_sync_s"] >= 0
    (prompts, params), = FakeLLM.instances[0].calls
    assert params.temperature == 0 and params.stop_token_ids == policy.stop_token_ids


def test_sampling_requests_mirror_the_rollout_config(fake_vllm, make_policy):
    policy, samples = make_policy("tiny_dense"), samples_of("arith", 2)
    cfg = SimpleNamespace(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=0, vllm={"gpu_memory_utilization": 0.5})
    batch = vllm_generate(policy, samples, cfg, n=3)
    llm, = FakeLLM.instances
    (prompts, params), = llm.calls
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (1, 0.7, 0.9, 0, 8)
    assert params.logprobs is None and params.logit_bias is None  # log-probs are recomputed by the trainer
    enc = policy.encode_prompts([s.prompt for s in samples])
    unpadded = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    assert [p["prompt_token_ids"] for p in prompts] == [ids for ids in unpadded for _ in range(3)]
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and batch.responses.shape[1] <= 8
    export = Path(llm.kwargs["model"])
    assert llm.kwargs["tokenizer"] == str(export) and (export / "config.json").exists()
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["gpu_memory_utilization"] == 0.5
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0


def _tree(path: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))}


def test_weights_are_pushed_in_memory_before_each_rollout(fake_vllm, make_policy, monkeypatch):
    policy, samples = make_policy("tiny_dense"), samples_of("arith", 2)
    before = vllm_generate(policy, samples, CFG, n=2, greedy=True)
    llm, = FakeLLM.instances
    export = Path(llm.kwargs["model"])
    files, saves = _tree(export), []
    monkeypatch.setattr(Policy, "save", lambda self, path: saves.append(path))
    monkeypatch.setattr(type(policy.model), "save_pretrained", lambda self, *a, **k: saves.append(a))
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(a))

    logp = response_logprobs(policy, before, 1.0)[0]  # (N, T)
    (-(logp * before.response_mask).sum()).backward()  # one SGD step on the greedy responses
    torch.optim.SGD(policy.model.parameters(), lr=1.0).step()
    after = vllm_generate(policy, samples, CFG, n=2, greedy=True)

    assert FakeLLM.instances == [llm] and len(llm.model.pushes) == 2 and llm.resets == 2
    now = hf_named_weights(policy.model)
    assert all(torch.equal(llm.model.pushes[1][k], now[k]) for k in now) and not llm.model.unmatched
    assert any(not torch.equal(llm.model.pushes[0][k], now[k]) for k in now)  # the step moved the weights
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in llm.model.hf.state_dict().items())
    assert_same_rollout(after, hf_generate(policy, samples, CFG, n=2, greedy=True))
    assert not torch.equal(after.input_ids, before.input_ids)  # decoded with the new weights
    assert saves == [] and _tree(export) == files  # nothing written after the first export
    release_engine(policy)
    assert not export.exists() and not hasattr(policy, vllm_engine.ENGINE_ATTR)


def test_vl_rows_pass_their_images(fake_vllm, make_policy):
    policy, samples = make_policy("tiny_vl"), samples_of("image_count", 2)
    hf = hf_generate(policy, samples, CFG, n=2, greedy=True)
    ours = vllm_generate(policy, samples, CFG, n=2, greedy=True)
    assert_same_rollout(ours, hf)  # same tokens: the engine saw the same pixels at the same image tokens
    (prompts, params), = FakeLLM.instances[0].calls
    image_pad = policy.model.config.image_token_id
    for prompt, sample, grid in zip(prompts, hf.samples, hf.mm["image_grid_thw"]):
        image, = sample.images
        assert np.array_equal(np.asarray(prompt["multi_modal_data"]["image"]), np.asarray(image.convert("RGB")))
        assert prompt["prompt_token_ids"].count(image_pad) == int(grid.prod()) // 4  # 2x2 patch merge
    suppressed = policy.model.generation_config.suppress_tokens
    assert params.logit_bias == {t: vllm_engine.SUPPRESS_BIAS for t in suppressed} and image_pad in suppressed
