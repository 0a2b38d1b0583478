"""EqLen's decoding loop: paired tracks in lockstep, forks by KV-cache row copy (arXiv 2604.17328, reconstructed).

The method, the reconstruction and every choice are documented in `seqrl.algorithms.eqlen`; this file holds the
mechanics. One batched, KV-cached loop (transformers `DynamicCache`) runs every track of every prompt:

- prefill once per prompt (images encoded once), then the cache rows are repeated for the n tracks;
- every step samples one token per running track (temperature, top-k, top-p and the model's `suppress_tokens`,
  in the order and with the arithmetic of HF `generate`, so the re-scoring `Policy.forward` at the same
  temperature sees the sampling distribution when top-k/top-p are off);
- all running tracks sit at the same response position t, so the cache needs no per-row offsets. A finished
  track frees its row (slot); a fork copies its parent's cache row into a free slot (or appends one) right after
  the forward pass that consumed the parent's token L-1, so the child starts with exactly the parent's cache for
  tokens [0, L) and the parent's next-token logits (nothing is re-decoded). Free slots decode garbage until a
  fork reuses them or they pass COMPACT_FRAC of the batch, when `Cache.reorder_cache` compacts the cache;
- positions are fed explicitly, as `Policy.forward` computes them: cumsum(mask) - 1 for text, Qwen2.5-VL's 3-D
  mrope positions (`get_rope_index`) for prompts with images; a response token continues from the prompt's last
  position + 1 on all three axes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from seqrl.models import get_family

UNPAIRED = ("stop", "untrained")
COMPACT_FRAC = 0.25  # compact the cache when more than this share of its rows are free slots


@dataclass
class Track:
    """One response. Tokens [0, start) are inherited from `parent` (a fork); a root track has start 0."""

    prompt: int  # index of the prompt it answers
    start: int = 0  # fork point L
    parent: int | None = None
    length: int = 0  # whole-response length (inherited prefix included)
    stopped: bool = False  # ended with a stop token (False: cut by the budget or the fork limit)

    @property
    def own_tokens(self) -> int:
        """Tokens this track generated itself."""
        return self.length - self.start


@dataclass
class Unit:
    """A comparison unit: the segment [start, end) of tracks a and b (same prompt, same prefix [0, start))."""

    a: int
    b: int
    start: int
    end: int


@dataclass
class Trace:
    tracks: list[Track]
    units: list[Unit]
    tokens: torch.Tensor  # (n_tracks, T) long; track i's response is tokens[i, :tracks[i].length]
    forks: list[int]  # forks per prompt
    seconds: float = 0.0
    untrained: int = 0  # generated tokens no unit trains (eqlen_unpaired=untrained only)

    @property
    def generated(self) -> int:
        """Generated tokens: every track's own tokens (forks' new tokens included, inherited prefixes not)."""
        return sum(t.own_tokens for t in self.tracks)


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                suppress: torch.Tensor | None) -> torch.Tensor:
    """HF generate's processing of next-token logits (B, V): suppress_tokens -> temperature -> top-k -> top-p."""
    logits = logits.to(torch.float32)
    if suppress is not None:
        logits = logits.masked_fill(suppress, -float("inf"))
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


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, greedy: bool,
                suppress: torch.Tensor | None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): the argmax (greedy) or a sample of softmax(warp_logits(...))."""
    if greedy:
        return warp_logits(logits, 1.0, 1.0, 0, suppress).argmax(-1)
    return torch.multinomial(warp_logits(logits, temperature, top_p, top_k, suppress).softmax(-1), 1).squeeze(1)


class _Rows:
    """The decoding batch: a slot (row) per running track, with its cache row, attention mask and next position.

    A finished track's slot is freed (track id -1) and keeps decoding garbage until a fork reuses it (an
    in-place copy of the parent's cache row) or free slots exceed COMPACT_FRAC of the batch, when the cache is
    compacted: one cache copy per compaction instead of one per finished track.
    """

    def __init__(self, model, enc: dict, family: str, n: int):
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
        mm = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
        kw = get_family(family).forward_kwargs(model, ids, mask, mm)
        kw.pop("output_router_logits", None)
        if "position_ids" not in kw:  # vl with images: Qwen2.5-VL's 3-D mrope positions
            kw["position_ids"] = model.model.get_rope_index(
                ids, image_grid_thw=mm["image_grid_thw"], attention_mask=mask,
                mm_token_type_ids=kw.pop("mm_token_type_ids"))[0]  # (3, B, P)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
        self.cache = out.past_key_values
        self.cache.batch_repeat_interleave(n)
        self.logits = out.logits[:, -1].repeat_interleave(n, 0)  # (B*n, V)
        self.mask = mask.repeat_interleave(n, 0)  # (B*n, P+t)
        self.next_pos = (kw["position_ids"][..., -1] + 1).repeat_interleave(n, -1)  # (B*n,) or (3, B*n)
        self.track = torch.arange(ids.shape[0] * n)  # (rows,) track id of each slot, -1 = free

    def select(self, idx: torch.Tensor) -> None:
        """Keep (and duplicate) rows `idx` (CPU long): KV cache, mask, positions, logits and track ids follow."""
        self.cache.reorder_cache(idx)
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
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[..., None],
                    past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]
        self.next_pos = self.next_pos + 1


class _Pairing:
    """Track bookkeeping: partners, open segments, closed units, fork budgets (pure Python, runs on events)."""

    def __init__(self, n_prompts: int, n: int, max_forks: int, unpaired: str):
        self.tracks = [Track(prompt=i // n) for i in range(n_prompts * n)]
        self.partner: dict[int, int | None] = {i: i ^ 1 for i in range(n_prompts * n)}  # pairs (0,1), (2,3), ...
        self.open_start = dict.fromkeys(range(n_prompts * n), 0)
        self.units: list[Unit] = []
        self.forks = [0] * n_prompts
        self.max_forks, self.unpaired = max_forks, unpaired
        self.untrained = 0

    def end(self, ended: dict[int, bool], length: int) -> tuple[set[int], list[tuple[int, int]]]:
        """Tracks `ended` ({track: stopped}) reached `length`; returns (tracks to drop, [(parent, child) forks])."""
        drop, forks = set(ended), []
        for tid, stopped in ended.items():
            self.tracks[tid].length, self.tracks[tid].stopped = length, stopped
        for tid in ended:
            mate = self.partner.pop(tid, None)
            if mate is None:  # a solo track (eqlen_unpaired=untrained) or a pair already closed
                if tid in self.open_start:
                    self.untrained += length - self.open_start.pop(tid)
                continue
            start = self.open_start.pop(tid)
            self.units.append(Unit(min(tid, mate), max(tid, mate), start, length))
            del self.open_start[mate]
            self.partner[mate] = None
            if mate in ended:
                self.partner.pop(mate)
                continue
            prompt = self.tracks[mate].prompt
            if self.forks[prompt] < self.max_forks:  # prefix inheritance: mate's remainder vs a fork of mate
                child = len(self.tracks)
                self.tracks.append(Track(prompt=prompt, start=length, parent=mate, length=length))
                self.forks[prompt] += 1
                self.partner[mate], self.partner[child] = child, mate
                self.open_start[mate] = self.open_start[child] = length
                forks.append((mate, child))
            elif self.unpaired == "stop":  # fork budget spent: cut the longer track at the unit's end
                self.tracks[mate].length, self.tracks[mate].stopped = length, False
                self.partner.pop(mate)
                drop.add(mate)
            else:  # "untrained": decode on alone; its remaining tokens train nowhere
                self.partner.pop(mate)
                self.open_start[mate] = length
        return drop, forks


@torch.no_grad()
def eqlen_decode(policy, enc: dict, *, n: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, greedy: bool = False, max_forks: int = 8, unpaired: str = "stop",
                 on_fork: Callable[[int, torch.Tensor], None] | None = None) -> Trace:
    """Decode n tracks (n/2 pairs) per prompt of `enc` (Policy.encode_prompts output, one row per prompt).

    `on_fork(child_track_id, logits (V,))` sees each fork's first next-token logits (tests). Returns the Trace.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n={n}: EqLen decodes responses in pairs; allowed: an even number >= 2")
    if unpaired not in UNPAIRED:
        raise ValueError(f"eqlen_unpaired={unpaired!r}: allowed: {', '.join(UNPAIRED)}")
    model = policy.model
    stop = torch.as_tensor(policy.stop_token_ids, device=model.device)
    suppressed = list(model.generation_config.suppress_tokens or [])
    t0 = time.perf_counter()
    rows = _Rows(model, {k: v.to(model.device) for k, v in enc.items()}, policy.family, n)
    suppress = None
    if suppressed:
        suppress = torch.zeros(rows.logits.shape[-1], dtype=torch.bool, device=model.device)
        suppress[suppressed] = True
    pairing = _Pairing(enc["input_ids"].shape[0], n, max_forks, unpaired)
    buf = torch.full((len(pairing.tracks), max_new_tokens), policy.pad_token_id, dtype=torch.long)
    for t in range(max_new_tokens):
        tok = sample_next(rows.logits, temperature, top_p, top_k, greedy, suppress)  # (slots,)
        live = rows.track >= 0  # (slots,)
        buf[rows.track[live], t] = tok.cpu()[live]
        is_stop = torch.isin(tok, stop).cpu() & live
        last = t + 1 == max_new_tokens
        if not (last or bool(is_stop.any())):
            rows.step(model, tok)
            continue
        ended = {tr: s for tr, s in zip(rows.track.tolist(), is_stop.tolist()) if tr >= 0 and (s or last)}
        drop, forks = pairing.end(ended, t + 1)
        if last or len(drop) == int(live.sum()):
            break
        kept = rows.release(drop, keep_free=len(forks))  # free slots decode garbage until reused or compacted
        rows.step(model, tok if kept is None else tok[kept.to(tok.device)])
        if forks:
            buf = torch.cat([buf, buf[torch.tensor([p for p, _ in forks])]])  # children inherit tokens [0, L)
            dst = rows.fork([p for p, _ in forks], [c for _, c in forks])
            if on_fork is not None:
                for (_, child), row in zip(forks, dst.tolist()):
                    on_fork(child, rows.logits[row].float().cpu())
    seconds = time.perf_counter() - t0
    return Trace(tracks=pairing.tracks, units=pairing.units, tokens=buf, forks=pairing.forks, seconds=seconds,
                 untrained=pairing.untrained)
