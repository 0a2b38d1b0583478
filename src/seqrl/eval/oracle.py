"""The oracle: a "model" that has memorised the references of the suite it is evaluated on (model family `oracle`).

`seqrl-eval model=oracle eval=math` (or `eval=vision`) must score 100.0 on every benchmark present locally: the
oracle's answers travel the same path as a real model's, so a miss is a bug in a gold mapping, the extractor, the
verifier, or in how the harness feeds items to the model (a prompt or image that was altered or dropped):
- build (`seqrl.models.build_policy` with conf/model/oracle.yaml): the model config's `arch` points at the run's
  own `eval` (and `data`) config; the oracle loads the suite with `harness.build_eval_sets`, exactly as the
  harness does, and memorises one response per item, keyed by a hash of the prompt text and of its images' pixels;
- `OracleFamily.encode` tokenizes the chat-formatted prompts (char tokenizer) and computes the same key per row;
- `OracleModel.generate` (the engines call it: `decode_with_generate`) writes "... \\boxed{<gold>}" for that key,
  e.g. `\\boxed{C}` for a multiple-choice item, as token ids ending with EOS; an item it never saw gets
  "I do not know.", and items it cannot tell apart (same prompt and images, different answers: text-only MathVista
  repeats questions such as "How many objects are left?") get "I cannot tell these items apart."; both are
  graded wrong. The response is then decoded, graded and summarised like any other.
The oracle has no parameters and no forward pass: it cannot be trained (config validation refuses it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from seqrl.models import Family, register_family

UNKNOWN = "I do not know."
AMBIGUOUS = "I cannot tell these items apart."


def item_key(prompt: str, images) -> int:
    """A 63-bit key of a prompt and the pixels of its images (PIL), the same at build and at generation."""
    h = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8)
    for image in images or []:
        image = image.convert("RGB")
        h.update(f"|{image.size}|".encode())
        h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def reference_response(sample) -> str:
    """The oracle's response to one item: its reference answer, boxed as a model would write it."""
    return f"I remember this one.\nThe answer is \\boxed{{{sample.answer}}}."


@dataclass
class OracleConfig:
    """What the oracle is built from: the model config's `arch` and the tokenizer."""

    arch: dict[str, Any]
    tokenizer: Any


class OracleModel(torch.nn.Module):
    """Answers each memorised item with its reference; `generate` has the transformers signature it is called with."""

    decode_with_generate = True  # the rollout engines call `generate` (there is no KV cache to decode with)

    def __init__(self, book: dict[int, str], tokenizer) -> None:
        super().__init__()
        self.book, self.tokenizer = book, tokenizer
        self.generation_config = GenerationConfig()

    @classmethod
    def from_config(cls, config: OracleConfig, **_load_kwargs) -> "OracleModel":
        """Load the suite named in `config.arch` (keys eval, data, data_dir) and memorise its references."""
        from omegaconf import OmegaConf

        from seqrl.config import DataConfig, EvalConfig
        from seqrl.data import materialize
        from seqrl.eval.harness import build_eval_sets

        arch = config.arch
        if not isinstance(arch.get("eval"), dict) or "data_dir" not in arch:
            raise ValueError("model.arch: the oracle needs {eval: ${eval}, data: ${data}, data_dir: "
                             "${paths.data_dir}} (use model=oracle, conf/model/oracle.yaml)")

        def typed(schema, node):
            return None if node is None else OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))

        sets = build_eval_sets(typed(EvalConfig, arch["eval"]), typed(DataConfig, arch.get("data")),
                               str(arch["data_dir"]), skipped={})
        book: dict[int, str] = {}
        for es in sets:
            for sample in map(materialize, es.samples):
                key, response = item_key(sample.prompt, sample.images), reference_response(sample)
                book[key] = response if book.get(key, response) == response else AMBIGUOUS
        return cls(book, config.tokenizer)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, oracle_keys: torch.Tensor, max_new_tokens: int, pad_token_id: int,
                 eos_token_id, **_sampling) -> torch.Tensor:
        """(B, P) prompts -> (B, P + T): each row's memorised response (cut at max_new_tokens) + EOS, then pads."""
        eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        rows = []
        for key in oracle_keys.tolist():
            ids = self.tokenizer(self.book.get(key, UNKNOWN), add_special_tokens=False)["input_ids"] + [eos]
            rows.append(ids[:max_new_tokens])
        out = torch.full((len(rows), max(map(len, rows))), pad_token_id, dtype=torch.long)  # (B, T)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = torch.tensor(ids)
        return torch.cat([input_ids, out], 1)


@register_family("oracle")
class OracleFamily(Family):
    """The oracle's registry entry: built from `arch` (no weights), prompts encoded with an item key per row."""

    model_type = "oracle"
    auto_model = OracleModel

    def random_config(self, arch: dict[str, Any], tokenizer) -> OracleConfig:
        return OracleConfig(arch=arch, tokenizer=tokenizer)

    def encode(self, policy, prompts: list[str], images) -> dict[str, torch.Tensor]:
        """The text family's left-padded chat encoding, plus `oracle_keys` (B,): one item key per prompt."""
        images = images if images is not None else [[] for _ in prompts]
        batch = super().encode(policy, prompts, None)
        batch["oracle_keys"] = torch.tensor([item_key(p, im) for p, im in zip(prompts, images)])  # (B,)
        return batch

    @staticmethod
    def explain_miss(record: dict) -> str:
        """Why the oracle missed a sample (seqrl-eval prints one line per miss): it knew the reference, so the
        grader is wrong; or the item was not the one it memorised; or its prompt and images are not unique."""
        if record["completion"] == AMBIGUOUS:
            return "not unique: other items have the same prompt and images but another answer"
        if record["completion"] == UNKNOWN:
            return "harness bug: the prompt or images the model saw differ from the benchmark's"
        return "grader bug"

    def forward_kwargs(self, model, input_ids, attention_mask, mm: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("model.family=oracle has no forward pass: it only answers benchmarks (seqrl-eval)")
