"""A batched, KV-cached decoding loop on a transformers model, shared by the standard and EqLen rollouts.

`generate()` keeps every finished row in the batch until the longest one ends and runs its logits processors and
stopping criteria as Python objects each step; on the small models and short budgets of RL that overhead and the
dead rows dominate. Here:

- prefill once per prompt (`seqrl.algorithms.packed.prefill`: images encoded once), then the cache rows are
  repeated for the n responses;
- every step samples one token per running row (temperature, top-k, top-p and the model's `suppress_tokens`,
  in the order and with the arithmetic of HF `generate`, so the re-scoring `Policy.forward` at the same
  temperature sees the sampling distribution when top-k/top-p are off); the draw is `draw` (inverse CDF, one
  uniform per row) instead of `torch.multinomial` (one exponential per vocabulary entry, 10x slower on CPU):
  the same distribution, other draws for the same RNG state. With `draw = multinomial_draw` a row's tokens
  equal `generate()`'s for the same RNG state until the first compaction (tests/test_decode.py);
- a finished row frees its slot; free slots decode garbage until a fork reuses them (EqLen) or they pass
  COMPACT_FRAC of the batch, when `Cache.reorder_cache` compacts the cache (one copy per compaction, not one per
  finished row);
- positions are fed explicitly, as `Policy.forward` computes them: cumsum(mask) - 1 for text, Qwen2.5-VL's 3-D
  mrope positions (`get_rope_index`) for prompts with images; a response token continues from the prompt's last
  position + 1 on all three axes;
- the steps of a llama-style decoder (dense, moe, vl) run `seqrl.algorithms.fastdecode.FastDecoder` (a slab KV
  cache written in place, the model's own sub-modules): the same logits to float rounding without the transformers
  forward's per-call work; other models step through their forward and DynamicCache;
- the entropy of each sampled position's softmax(logits / temperature) is recorded (`RolloutBatch.token_entropy`).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

from seqrl.algorithms.fastdecode import FastDecoder
from seqrl.algorithms.packed import prefill
from seqrl.models import get_family

COMPACT_FRAC = 0.25  # compact the cache when more than this share of its rows are free slots


def prompt_inputs(model, family: str, enc: dict) -> dict:
    """Forward kwargs for a prefill of left-padded prompts `enc` with explicit positions: cumsum(mask) - 1 for text,
    Qwen2.5-VL's 3-D mrope positions (`get_rope_index`, (3, B, P)) for prompts with images; images included."""
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    mm = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    kw = get_family(family).forward_kwargs(model, ids, mask, mm)
    if "position_ids" not in kw:  # vl with images
        kw["position_ids"] = model.model.get_rope_index(
            ids, image_grid_thw=mm["image_grid_thw"], attention_mask=mask,
            mm_token_type_ids=kw.pop("mm_token_type_ids"))[0]  # (3, B, P)
    return kw


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                suppress: torch.Tensor | None) -> torch.Tensor:
    """HF generate's processing of next-token logits (B, V): suppress_tokens -> temperature -> top-k -> top-p."""
    logits = logits.to(torch.float32)
    if suppress is not None:
        logits = logits.masked_fill(suppress, -float("inf"))
    if temperature != 1.0:  # generate() adds no temperature warper at 1.0 (x / 1 is x)
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # (B, V)
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return logits


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) entropy of softmax(logits (B, V) / temperature) over the whole vocabulary, no warping: the quantity
    the training forward logs as train/entropy (`seqrl.algorithms.scoring._token_logp`)."""
    z = logits.float() / temperature
    lse = z.logsumexp(-1, keepdim=True)  # (B, 1)
    return (lse - (z - lse).exp().mul(z).sum(-1, keepdim=True)).squeeze(1)


def inverse_cdf_draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (B, V) (rows sum to 1; zeros allowed): the first v with CDF(v) > u,
    u ~ U[0, total) from `torch.rand`, the CDF in float64. A zero-probability token is never drawn (its CDF equals
    its predecessor's); a u rounded up to the total falls back to the row's last positive token."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device).mul_(cdf[:, -1:])  # (B, 1)
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)
    over = tok == probs.shape[-1]
    if bool(over.any()):
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
        tok = torch.where(over, last, tok)
    return tok


def multinomial_draw(probs: torch.Tensor) -> torch.Tensor:
    """`torch.multinomial(probs, 1)`, HF generate's draw (tests swap it in to compare tokens with generate())."""
    return torch.multinomial(probs, 1).squeeze(1)


draw = inverse_cdf_draw  # the sampler of every decoding loop (module attribute: tests swap it)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, greedy: bool,
                suppress: torch.Tensor | None, entropy: bool = False):
    """Next tokens (B,) from logits (B, V): the argmax (greedy) or a `draw` from softmax(warp_logits(...)); with
    `entropy` (sampling only), (tokens, `token_entropy` (B,)), read off the sampling probabilities when no warper
    but the temperature is on."""
    if greedy:
        return warp_logits(logits, 1.0, 1.0, 0, suppress).argmax(-1)
    probs = warp_logits(logits, temperature, top_p, top_k, suppress).softmax(-1)  # (B, V)
    tok = draw(probs)
    if not entropy:
        return tok
    plain = suppress is None and top_k == 0 and top_p >= 1.0  # probs = softmax(logits / temperature)
    return tok, torch.special.entr(probs).sum(-1) if plain else token_entropy(logits, temperature)


class DecodeRows:
    """The decoding batch: a slot (row) per running track, with its cache row, attention mask and next position.

    A finished track's slot is freed (track id -1) and keeps decoding garbage until a fork reuses it (an
    in-place copy of the parent's cache row) or free slots exceed COMPACT_FRAC of the batch, when the cache is
    compacted: one cache copy per compaction instead of one per finished track.

    The prefill is `packed.prefill` (the packed layers for text prompts of a supported dense decoder when `fast` is
    on, else the model's forward: images, mrope positions); the steps run `FastDecoder` (its slab cache) when
    the model is a supported llama-style decoder and `fast` is on, else the model's forward on its DynamicCache.
    `room`: the steps to come (the fast path's cache capacity; it grows past it).
    """

    def __init__(self, model, enc: dict, family: str, n: int, room: int = 0, fast: bool = True):
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
        kw = prompt_inputs(model, family, enc)
        kw.pop("output_router_logits", None)
        logits, cache = prefill(model, ids, mask, kw, packed=fast)
        self.logits = logits.repeat_interleave(n, 0)  # (B*n, V)
        self.mask = mask.repeat_interleave(n, 0)  # (B*n, P+t); with the fast path the prompts' (B*n, P)
        self.fast = FastDecoder.build(model, cache, self.mask, room, n) if fast else None
        self.cache = None  # with the fast path, its slab holds the keys and values
        if self.fast is None:
            self.cache = cache
            self.cache.batch_repeat_interleave(n)
        self.next_pos = (kw["position_ids"][..., -1] + 1).repeat_interleave(n, -1)  # (B*n,) or (3, B*n)
        self.track = torch.arange(ids.shape[0] * n)  # (rows,) track id of each slot, -1 = free

    def select(self, idx: torch.Tensor) -> None:
        """Keep (and duplicate) rows `idx` (CPU long): KV cache, mask, positions, logits and track ids follow."""
        self.fast.select(idx) if self.fast is not None else self.cache.reorder_cache(idx)
        self.mask, self.track, self.logits = self.mask[idx], self.track[idx], self.logits[idx]
        self.next_pos = self.next_pos[..., idx]

    def release(self, tracks: set[int], keep_free: int) -> torch.Tensor | None:
        """Free the slots of `tracks`; if more than COMPACT_FRAC of the slots (beyond keep_free) are free, compact
        and return the kept row indices (None when nothing moved)."""
        if tracks:
            self.track[torch.isin(self.track, torch.tensor(sorted(tracks)))] = -1
        free = (self.track < 0).nonzero().squeeze(1)
        if len(free) - keep_free <= COMPACT_FRAC * len(self.track):
            return None
        kept = torch.cat([(self.track >= 0).nonzero().squeeze(1), free[:keep_free]])
        self.select(kept)
        return kept

    def fork(self, parents: list[int], children: list[int]) -> torch.Tensor:
        """Give each child a copy of its parent's slot (cache row, mask, position, logits); returns child rows."""
        where = {tr: i for i, tr in enumerate(self.track.tolist())}
        src = torch.tensor([where[p] for p in parents])
        free = (self.track < 0).nonzero().squeeze(1)
        dst, extra = free[:len(src)], src[len(free):]
        if len(dst):
            if self.fast is not None:
                self.fast.copy_rows(dst, src[:len(dst)])
            else:
                for layer in self.cache.layers:
                    layer.keys[dst.to(layer.keys.device)] = layer.keys[src[:len(dst)].to(layer.keys.device)]
                    layer.values[dst.to(layer.values.device)] = layer.values[src[:len(dst)].to(layer.values.device)]
            self.mask[dst], self.logits[dst] = self.mask[src[:len(dst)]], self.logits[src[:len(dst)]]
            self.next_pos[..., dst] = self.next_pos[..., src[:len(dst)]]
        if len(extra):  # no free slot left: append rows
            n_rows = len(self.track)
            self.select(torch.cat([torch.arange(n_rows), extra]))
            dst = torch.cat([dst, torch.arange(n_rows, n_rows + len(extra))])
        self.track[dst] = torch.tensor(children)
        return dst

    def step(self, model, tokens: torch.Tensor) -> None:
        """Feed one token per slot (B,); the logits for the next position replace `self.logits`."""
        if self.fast is not None:  # it keeps its own padding bias: `mask` stays the prompts'
            self.logits, self.next_pos = self.fast.step(tokens, self.next_pos), self.next_pos + 1
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[..., None],
                    past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        self.next_pos = self.next_pos + 1


def inference(fn):
    """`fn` under `torch.inference_mode` (no version counters or autograd metadata per op: a tiny_dense decode step
    of one row 0.48 -> 0.39 ms), its tensor results (also a dataclass's) cloned to normal tensors, which autograd
    may save later (an inference tensor cannot be saved for backward)."""

    def plain(x):
        if isinstance(x, torch.Tensor):
            return x.clone() if x.is_inference() else x
        if isinstance(x, tuple):
            return tuple(map(plain, x))
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)
                                             if isinstance(getattr(x, f.name), torch.Tensor)})
        return x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return plain(out)

    return wrapper


def suppress_mask(model, vocab: int) -> torch.Tensor | None:
    """(V,) bool mask of the model's generation_config.suppress_tokens, or None when there are none."""
    suppressed = list(model.generation_config.suppress_tokens or [])
    if not suppressed:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=model.device)
    mask[suppressed] = True
    return mask


@inference
def decode(policy, enc: dict, *, n: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """n independent responses per prompt of `enc` (Policy.encode_prompts output, one row per prompt).

    Returns (tokens (B*n, T) long with T <= max_new_tokens the longest response, rows grouped by prompt, pad
    after each row's stop token; the entropy (B*n, T) of softmax(logits / temperature) where each token was
    sampled (`token_entropy`; None when greedy); seconds of prefill + decoding). Rows stop at any of
    `policy.stop_token_ids`; finished rows leave the batch.
    """
    model = policy.model
    stop = torch.as_tensor(policy.stop_token_ids, device=model.device)
    t0 = time.perf_counter()
    rows = DecodeRows(model, {k: v.to(model.device) for k, v in enc.items()}, policy.family, n, max_new_tokens)
    suppress = suppress_mask(model, rows.logits.shape[-1])
    buf = torch.full((len(rows.track), max_new_tokens), policy.pad_token_id, dtype=torch.long)
    ent = None if greedy else torch.zeros(buf.shape)
    running, t = len(rows.track), 0
    for t in range(max_new_tokens):
        if ent is None:
            tok = sample_next(rows.logits, temperature, top_p, top_k, greedy, suppress)  # (slots,)
        else:
            tok, tok_ent = sample_next(rows.logits, temperature, top_p, top_k, greedy, suppress, entropy=True)
        live = rows.track >= 0  # (slots,)
        idx = rows.track[live]
        buf[idx, t] = tok.cpu()[live]
        if ent is not None:
            ent[idx, t] = tok_ent.cpu()[live]
        is_stop = torch.isin(tok, stop).cpu() & live
        if t + 1 == max_new_tokens:
            break
        kept = None
        if bool(is_stop.any()):
            running -= int(is_stop.sum())
            if running == 0:
                break
            kept = rows.release(set(rows.track[is_stop].tolist()), keep_free=0)
        rows.step(model, tok if kept is None else tok[kept.to(tok.device)])
    width = t + 1  # as generate(): as wide as the longest response
    return buf[:, :width], None if ent is None else ent[:, :width], time.perf_counter() - t0
