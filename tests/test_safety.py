"""Safety by construction: no model output is ever evaluated or handed to a shell, checkpoints and caches load with
weights_only=True, remote code is off unless a user turns it on, and exports are swapped in atomically."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

SOURCES = sorted((ROOT / "src" / "seqrl").rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "?") if isinstance(f, ast.Attribute) else ""  # "" = a bare name
            yield node, owner, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_eval_exec_shell_or_unsafe_loads(path):
    tree = ast.parse(path.read_text())
    for node, owner, name in _calls(tree):
        where = f"{path.name}:{node.lineno}"
        assert not (owner == "" and name in ("eval", "exec", "compile")), f"{where}: {name}()"
        assert not (owner == "os" and name in ("system", "popen")), f"{where}: os.{name}()"
        assert not (owner == "pickle" and name in ("load", "loads")), f"{where}: pickle.{name}()"
        kwargs = {k.arg: k.value for k in node.keywords}
        assert not (isinstance(kwargs.get("shell"), ast.Constant) and kwargs["shell"].value), f"{where}: shell=True"
        if owner == "torch" and name == "load":
            wo = kwargs.get("weights_only")
            assert isinstance(wo, ast.Constant) and wo.value is True, f"{where}: torch.load without weights_only=True"


def test_remote_code_is_off_in_every_model_config_and_by_default():
    from seqrl.config import ModelConfig

    assert ModelConfig().trust_remote_code is False
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path.name


def test_export_is_swapped_in_whole(tmp_path):
    from seqrl.results import export_dir_atomic

    target = tmp_path / "hf"
    export_dir_atomic(target, lambda d: (d / "a.txt").write_text("one"))
    with pytest.raises(RuntimeError):
        def half(d: Path):
            (d / "a.txt").write_text("two")
            raise RuntimeError("killed mid-export")
        export_dir_atomic(target, half)
    assert (target / "a.txt").read_text() == "one"  # the old export survives a failed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary leftovers
    export_dir_atomic(target, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_results_and_checkpoints_are_all_or_nothing(tmp_path):
    """A writer that dies half-way leaves the previous file intact and no temporary file behind."""
    import torch

    from seqrl.checkpointing import AtomicCheckpointIO
    from seqrl.results import write_json_atomic, write_jsonl_atomic

    class Boom:
        def __repr__(self):
            raise RuntimeError("killed mid-write")

    results = tmp_path / "results.json"
    write_json_atomic(results, {"ok": 1})
    with pytest.raises(RuntimeError):
        write_json_atomic(results, {"ok": 2, "partial": Boom()})  # json.dump calls default(str) -> repr -> raises
    assert results.read_text() == '{\n  "ok": 1\n}'
    rows = tmp_path / "samples.jsonl"
    write_jsonl_atomic(rows, [{"a": 1}])
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(rows, ({"a": 2} if i == 0 else Boom() for i in range(2)))
    assert rows.read_text() == '{"a": 1}\n'
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, ckpt)
    with pytest.raises(Exception):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "bad": lambda: 0}, ckpt)
    assert torch.equal(torch.load(ckpt, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "results.json", "samples.jsonl"]
