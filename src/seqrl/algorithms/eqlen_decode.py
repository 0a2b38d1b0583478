"""EqLen's decoding loop: paired tracks in lockstep, forks by KV-cache row copy (arXiv 2604.17328, reconstructed).

The method, the reconstruction and every choice are documented in `seqrl.algorithms.eqlen`; this file holds the
mechanics, on top of the shared KV-cached loop of `seqrl.algorithms.decode` (prefill once per prompt, sampling
with HF generate's arithmetic, free slots compacted, explicit positions). EqLen adds pairing and forks:

- all running tracks sit at the same response position t, so the cache needs no per-row offsets;
- a finished track frees its slot; a fork copies its parent's cache row into a free slot (or appends one) right
  after the forward pass that consumed the parent's token L-1, so the child starts with exactly the parent's
  cache for tokens [0, L) and the parent's next-token logits (nothing is re-decoded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from seqrl.algorithms.decode import DecodeRows, inference, sample_next, suppress_mask

UNPAIRED = ("stop", "untrained")


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


@inference
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
    t0 = time.perf_counter()
    rows = DecodeRows(model, {k: v.to(model.device) for k, v in enc.items()}, policy.family, n, max_new_tokens)
    suppress = suppress_mask(model, rows.logits.shape[-1])
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
