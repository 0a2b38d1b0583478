"""Rollouts: G sampled responses per prompt, batched and KV-cached, in one padded batch structure.

Registry `ROLLOUTS` maps a rollout config name (`rollout.name`) to a function
`(policy, samples, cfg, *, n, greedy) -> RolloutBatch`. The standard rollout (GRPO, arXiv 2402.03300, section 4.1:
G outputs sampled from the old policy per question) runs on an engine (`rollout.engine`): `hf` (default), seqrl's
batched KV-cached loop on the transformers model (`seqrl.algorithms.decode`); `hf_generate`, the model's own
`generate()` (same distribution, slower: it decodes finished rows to the end); `vllm` (`vllm_engine`). EqLen
(arXiv 2604.17328) registers its own entry. Every consumer (advantages, losses, evaluation) reads only
`RolloutBatch`, so a rollout mode plugs in without any loss knowing about it.

Layout: row r = [left-padded prompt (P) | right-padded response (T)]; `response_mask` marks the response tokens up to
and including the first end-of-sequence token. Log-probabilities are computed at the sampling temperature (logits / T)
so that the on-policy importance ratio is exactly 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from seqrl.algorithms.decode import decode
from seqrl.algorithms.scoring import response_logprobs, trim_padding  # noqa: F401  (re-exported: the scoring API)

ROLLOUTS: dict[str, Callable] = {}


def register_rollout(name: str):
    def deco(fn):
        ROLLOUTS[name] = fn
        return fn

    return deco


@dataclass
class RolloutBatch:
    samples: list  # one seqrl.data.Sample per row (N rows)
    input_ids: torch.Tensor  # (N, P+T)
    attention_mask: torch.Tensor  # (N, P+T)
    response_mask: torch.Tensor  # (N, T) float, 1 on trained response tokens
    prompt_len: int  # P
    group_ids: torch.Tensor  # (N,) long: rows sharing a prompt (or an EqLen comparison unit)
    texts: list[str]  # decoded responses
    truncated: torch.Tensor  # (N,) bool: no end-of-sequence within the budget
    mm: dict = field(default_factory=dict)  # multimodal tensors (pixel_values, image_grid_thw)
    gen_seconds: float = 0.0
    full_lengths: torch.Tensor | None = None  # (N,) whole-response lengths when rows hold segments (EqLen)
    prompt_ids: torch.Tensor | None = None  # (N,) the prompt of each row; None = group_ids (one group per prompt)
    response_ids: torch.Tensor | None = None  # (N,) the whole response of each row; None = one response per row
    metrics: dict = field(default_factory=dict)  # rollout-specific metrics (e.g. eqlen/*), logged as they are
    # (N, T) entropy of softmax(logits / temperature) at each sampled position, from the engine (hf) when it has
    # it: train/entropy of the rows an on-policy update leaves unscored (RLModule._rows_with_gradient)
    token_entropy: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]  # (N, T)

    @property
    def lengths(self) -> torch.Tensor:
        """Trained tokens per row (the segment length for EqLen rows)."""
        return self.response_mask.sum(1)  # (N,)

    @property
    def row_prompts(self) -> torch.Tensor:
        return self.group_ids if self.prompt_ids is None else self.prompt_ids  # (N,)

    def one_row_per_response(self) -> torch.Tensor:
        """Indices of one row per whole response (rows holding segments of the same response counted once)."""
        if self.response_ids is None:
            return torch.arange(len(self))
        _, first = torch.unique(self.response_ids, return_inverse=True)
        return torch.zeros(int(first.max()) + 1, dtype=torch.long).scatter_reduce(
            0, first, torch.arange(len(self)), reduce="amin", include_self=False)  # (n_responses,)

    @property
    def response_lengths(self) -> torch.Tensor:
        """Length of the whole response each row belongs to (used by length-based reward shaping)."""
        return self.lengths if self.full_lengths is None else self.full_lengths  # (N,)

    def to(self, device) -> "RolloutBatch":
        """The batch with every tensor on `device` (the rollout engines return CPU tensors)."""
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **move, mm={k: v.to(device) for k, v in self.mm.items()})

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The sub-batch of `rows` (a 1-D long tensor), multimodal tensors included."""
        idx = rows.tolist()
        return replace(
            self,
            samples=[self.samples[i] for i in idx],
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            group_ids=self.group_ids[rows],
            texts=[self.texts[i] for i in idx],
            truncated=self.truncated[rows],
            full_lengths=None if self.full_lengths is None else self.full_lengths[rows],
            prompt_ids=None if self.prompt_ids is None else self.prompt_ids[rows],
            response_ids=None if self.response_ids is None else self.response_ids[rows],
            token_entropy=None if self.token_entropy is None else self.token_entropy[rows],
            mm=_select_mm(self.mm, idx, [len(s.images or []) for s in self.samples]),
        )


def _select_mm(mm: dict, rows: list[int], images_per_row: list[int]) -> dict:
    """Select the image rows of Qwen-VL style inputs: pixel_values are the rows' patches concatenated."""
    if not mm:
        return mm
    grid = mm["image_grid_thw"]  # (n_images, 3)
    patches = grid.prod(-1)  # (n_images,)
    img_start = torch.tensor([0] + images_per_row).cumsum(0)
    patch_start = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
    imgs = [i for r in rows for i in range(int(img_start[r]), int(img_start[r + 1]))]
    pix = [mm["pixel_values"][patch_start[i]:patch_start[i + 1]] for i in imgs]
    return {"pixel_values": torch.cat(pix), "image_grid_thw": grid[imgs]}


def response_mask_from(responses: torch.Tensor, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first stop token; truncated = no stop token in the row."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids))  # (N, T)
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (N, T) an EOS strictly earlier
    return (~seen_before).float(), ~is_eos.any(1)


def _encode(policy, samples: list) -> dict:
    """Left-padded, chat-formatted prompts of `samples`, one row each, with their images (vl)."""
    images = [s.images or [] for s in samples]
    return policy.encode_prompts([s.prompt for s in samples], images if any(images) else None)


def _batch(policy, rows: list, enc: dict, responses: torch.Tensor, n: int, gen_seconds: float) -> RolloutBatch:
    """RolloutBatch of sampled `responses` (N, T): pad after the first stop token, masks, texts, images."""
    mask, truncated = response_mask_from(responses, policy.stop_token_ids)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, policy.pad_token_id))
    return RolloutBatch(
        samples=rows, input_ids=torch.cat([enc["input_ids"], responses], 1),
        attention_mask=torch.cat([enc["attention_mask"], mask.long()], 1), response_mask=mask,
        prompt_len=enc["input_ids"].shape[1], group_ids=torch.arange(len(rows) // n).repeat_interleave(n),
        texts=policy.tokenizer.batch_decode(responses, skip_special_tokens=True), truncated=truncated,
        mm={k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}, gen_seconds=gen_seconds,
    )


class intra_op_threads:
    """Context: torch's intra-op thread count set to `n` (None: unchanged), the previous count restored after."""

    def __init__(self, n: int | None):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


class _eval_mode:
    """Context: the model in eval mode (no dropout), its previous mode restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def hf_generate(policy, samples: list, cfg, *, n: int, greedy: bool = False) -> RolloutBatch:
    """Sample `n` responses per sample with the model's own KV-cached `generate` (engine `hf_generate`).

    cfg needs max_new_tokens, temperature, top_p, top_k (seqrl.config.RolloutConfig or EvalConfig).
    """
    rows = [s for s in samples for _ in range(n)]
    enc = _encode(policy, rows)
    P = enc["input_ids"].shape[1]
    sampling = {} if greedy else dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=getattr(cfg, "top_k", 0))
    device = getattr(policy.model, "device", "cpu")
    t0 = time.perf_counter()
    with _eval_mode(policy.model):
        out = policy.model.generate(
            **{k: v.to(device) for k, v in enc.items()}, do_sample=not greedy, max_new_tokens=cfg.max_new_tokens,
            use_cache=True, pad_token_id=policy.pad_token_id, eos_token_id=policy.stop_token_ids, **sampling,
        )  # (N, P+T)
    return _batch(policy, rows, enc, out[:, P:].cpu(), n, time.perf_counter() - t0)


def hf_decode(policy, samples: list, cfg, *, n: int, greedy: bool = False) -> RolloutBatch:
    """Sample `n` responses per sample with seqrl's KV-cached loop on the HF model (engine `hf`, the default):
    the same distribution as `hf_generate`, finished rows leave the batch (`seqrl.algorithms.decode`).

    Models that only answer through their own `generate` (`decode_with_generate = True`, e.g. the oracle) use it.
    """
    if getattr(policy.model, "decode_with_generate", False):
        return hf_generate(policy, samples, cfg, n=n, greedy=greedy)
    enc = _encode(policy, samples)  # one row per prompt
    with _eval_mode(policy.model):
        tokens, entropy, seconds = decode(policy, enc, n=n, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, top_p=cfg.top_p, top_k=getattr(cfg, "top_k", 0),
                                          greedy=greedy)  # (N, T)
    rows = torch.arange(len(samples)).repeat_interleave(n)  # (N,) the prompt of each row
    enc_rows = {k: enc[k][rows] for k in ("input_ids", "attention_mask")}  # (N, P)
    enc_rows.update(_select_mm({k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}, rows.tolist(),
                               [len(s.images or []) for s in samples]))
    batch = _batch(policy, [samples[i] for i in rows.tolist()], enc_rows, tokens, n, seconds)
    return batch if entropy is None else replace(batch, token_entropy=entropy * batch.response_mask)


def _vllm(policy, samples: list, cfg, *, n: int, greedy: bool = False) -> RolloutBatch:
    from seqrl.algorithms.vllm_engine import vllm_generate  # optional: only this engine needs vLLM

    return vllm_generate(policy, samples, cfg, n=n, greedy=greedy)


ENGINES: dict[str, Callable] = {"hf": hf_decode, "hf_generate": hf_generate, "vllm": _vllm}


def generate(policy, samples: list, cfg, *, n: int, greedy: bool = False) -> RolloutBatch:
    """n sampled responses per sample from the engine `cfg.engine` (default hf; EvalConfig has none: hf)."""
    return ENGINES[getattr(cfg, "engine", "hf")](policy, samples, cfg, n=n, greedy=greedy)


@register_rollout("standard")
def standard_rollout(policy, samples: list, cfg, *, n: int, greedy: bool = False) -> RolloutBatch:
    """GRPO-style group sampling (arXiv 2402.03300): n i.i.d. samples per prompt from the current policy."""
    return generate(policy, samples, cfg, n=n, greedy=greedy)


def cat_rollouts(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Concatenate rollouts (dynamic-sampling refills), re-padding prompts on the left and responses on the right."""
    P = max(b.prompt_len for b in batches)
    T = max(b.response_mask.shape[1] for b in batches)

    def pad(b: RolloutBatch, x: torch.Tensor, value) -> torch.Tensor:
        left, right = P - b.prompt_len, T - b.response_mask.shape[1]
        return torch.nn.functional.pad(x, (left, right), value=value)

    def offset_ids(get) -> torch.Tensor | None:  # ids stay unique across the concatenated rollouts
        if get(batches[0]) is None:
            return None
        out, offset = [], 0
        for b in batches:
            out.append(get(b) + offset)
            offset += int(get(b).max()) + 1 if len(b) else 0
        return torch.cat(out)

    return RolloutBatch(
        samples=[s for b in batches for s in b.samples],
        input_ids=torch.cat([pad(b, b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([pad(b, b.attention_mask, 0) for b in batches]),
        response_mask=torch.cat([torch.nn.functional.pad(b.response_mask, (0, T - b.response_mask.shape[1]))
                                 for b in batches]),
        prompt_len=P, group_ids=offset_ids(lambda b: b.group_ids), texts=[t for b in batches for t in b.texts],
        truncated=torch.cat([b.truncated for b in batches]),
        mm={k: torch.cat([b.mm[k] for b in batches]) for k in batches[0].mm},
        gen_seconds=sum(b.gen_seconds for b in batches),
        full_lengths=None if batches[0].full_lengths is None else torch.cat([b.full_lengths for b in batches]),
        prompt_ids=offset_ids(lambda b: b.prompt_ids), response_ids=offset_ids(lambda b: b.response_ids),
        metrics={k: sum(b.metrics[k] for b in batches) / len(batches)  # mean over the rollouts
                 for k in batches[0].metrics if all(k in b.metrics for b in batches)},
        token_entropy=None if any(b.token_entropy is None for b in batches) else torch.cat(
            [torch.nn.functional.pad(b.token_entropy, (0, T - b.token_entropy.shape[1])) for b in batches]),
    )


def rollout_from_texts(policy, samples: list, responses: list[str]) -> RolloutBatch:
    """A RolloutBatch holding given response texts (teacher forcing: warm-up, tests), each closed by EOS."""
    images = [s.images or [] for s in samples]
    enc = policy.encode_prompts([s.prompt for s in samples], images if any(images) else None)
    ids = [policy.tokenizer(r, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for r in responses]
    T = max(map(len, ids))
    resp = torch.full((len(ids), T), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T)
    for i, row in enumerate(ids):
        resp[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return RolloutBatch(
        samples=list(samples), input_ids=torch.cat([enc["input_ids"], resp], 1),
        attention_mask=torch.cat([enc["attention_mask"], mask.long()], 1), response_mask=mask,
        prompt_len=enc["input_ids"].shape[1], group_ids=torch.arange(len(samples)), texts=list(responses),
        truncated=torch.zeros(len(samples), dtype=torch.bool),
        mm={k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc},
    )

