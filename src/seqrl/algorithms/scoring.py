"""Scoring rollouts: per-token log pi(y_t | y_<t) of the responses (and the token entropy) for the update, the
old-policy and the reference log-probs.

Three exact savings over one full-width forward of [prompt | response] per row (values and gradients equal up to
float rounding, tests/test_logprobs.py):

- the language-model head runs only on the positions that predict response tokens (`logits_to_keep`), and the
  log-softmax is a logsumexp + gather (no (N, T, V) log-prob copy);
- columns that are padding in every row are cut (left prompt padding, right response padding); with `buckets` > 1
  rows are sorted by length and scored in `buckets` forwards, each cut to its own longest row;
- shared prompts are encoded once: a group's G rows share one prompt, so the prompt runs once per distinct prompt
  (with gradient; `seqrl.algorithms.packed.prefill`), its KV cache is repeated to the rows (`_repeat_rows`,
  differentiable), and only the responses run per row, with explicit positions continuing the prompt's
  (`seqrl.algorithms.decode.prompt_inputs`). The first response token is predicted from the prompt forward's last
  position. Not for moe models, whose router
  aux loss needs one attention mask over all tokens of a forward, nor under activation checkpointing, which keeps
  no cache (both take the full-width path);
- after the shared prompt, a llama-style decoder (dense, vl) runs the responses as one flat list of their real
  tokens (`seqrl.algorithms.packed`): no norm, projection or MLP work on response padding.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from transformers.cache_utils import DynamicLayer

from seqrl.algorithms.decode import prompt_inputs
from seqrl.algorithms.packed import packed_responses, prefill


def trim_padding(batch) -> tuple:
    """The batch without prompt columns that are padding in every row (left) and response columns past every row's
    last attended token (right): exact, positions come from the attention mask. Returns (batch, kept width t)."""
    P = batch.prompt_len
    seen = batch.attention_mask.any(0)  # (P+T,)
    first = int(seen[:P].long().argmax()) if bool(seen[:P].any()) else P - 1
    t = int(seen[P:].nonzero().max()) + 1 if bool(seen[P:].any()) else 1
    if first == 0 and t == batch.response_mask.shape[1]:
        return batch, t
    cols = slice(first, P + t)
    return replace(batch, input_ids=batch.input_ids[:, cols], attention_mask=batch.attention_mask[:, cols],
                   response_mask=batch.response_mask[:, :t], prompt_len=P - first), t


def _token_logp(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """(log-prob of `targets` (N, T), entropy (N, T) | None) under softmax(logits (N, T, V) / temperature)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)  # (N, T)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (N, T)
    if not entropy:
        return logp, None
    with torch.no_grad():
        return logp, lse - (logits - lse.unsqueeze(-1)).exp_().mul_(logits).sum(-1)  # (N, T)


def weighted_metrics(parts: list[tuple[dict, float]]) -> dict:
    """Token-weighted mean of router-metric dicts [(metrics, tokens)]."""
    total = sum(w for m, w in parts if m) or 1.0
    keys = {k for m, _ in parts for k in m}
    return {k: sum(float(m.get(k, 0.0)) * w for m, w in parts if m) / total for k in keys}


def _full(policy, batch, temperature: float, entropy: bool):
    """One forward of [prompt | response] per row; logits only for the response-predicting positions."""
    T = batch.response_mask.shape[1]
    out = policy.forward(batch.input_ids, batch.attention_mask, logits_to_keep=T + 1, **batch.mm)
    logp, ent = _token_logp(out.logits[:, :-1], batch.responses, temperature, entropy)  # (N, T)
    return logp, ent, policy.router_metrics(out, batch.attention_mask)


def _repeat_rows(cache, inverse: torch.Tensor, n_prompts: int) -> None:
    """Row i of every cache layer becomes prompt inverse[i]'s. Plain layers take a one-hot matmul, whose backward is
    a small matmul too (exact: sums of x * 1 and zeros); index_select's backward scatters into an expanded index, 4x
    slower here. Other layer types use the cache's own `reorder_cache`."""
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.reorder_cache(inverse)
        return
    for layer in cache.layers:
        pick = torch.nn.functional.one_hot(inverse, n_prompts).to(layer.keys.dtype)  # (N, U)
        layer.keys, layer.values = ((pick @ x.flatten(1)).view(len(inverse), *x.shape[1:])
                                    for x in (layer.keys, layer.values))


def _shared_prompts(policy, batch, temperature: float, entropy: bool):
    """Each distinct prompt once (with gradient), its KV cache repeated to its rows, then the responses per row.
    None when no prompt repeats (nothing to share)."""
    P, (N, T) = batch.prompt_len, batch.response_mask.shape
    prompts = batch.input_ids[:, :P]  # (N, P)
    key = torch.cat([batch.row_prompts.unsqueeze(1).to(prompts), prompts], 1)  # same sample (images) and tokens
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # (U, 1+P), (N,)
    model = policy.model
    checkpointing = getattr(model, "is_activation_checkpointing", False)  # transformers >= 5.x name
    if len(uniq) == len(prompts) or (checkpointing and torch.is_grad_enabled()):
        return None  # nothing to share; or activation checkpointing, under which transformers keeps no cache
    first = torch.full((len(uniq),), len(prompts), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(prompts)), reduce="amin")  # (U,) a row holding each distinct prompt
    head = batch.select(first)  # images of those rows (vl)
    enc = {"input_ids": head.input_ids[:, :P], "attention_mask": head.attention_mask[:, :P], **head.mm}
    kw = prompt_inputs(model, policy.family, enc)
    if kw.get("output_router_logits"):  # moe: the router aux loss needs one mask over all tokens of one forward
        return None
    logits, cache = prefill(model, enc["input_ids"], enc["attention_mask"], kw)  # (U, V), the prompts' cache
    if cache is None:  # a wrapper that turned the cache off
        return None
    _repeat_rows(cache, inverse.to(prompts.device), len(uniq))  # (N rows): gradients flow back to the prompt forward
    start = (kw["position_ids"][..., -1] + 1)[..., inverse]  # (N,) or (3, N): the first response position
    positions = start.unsqueeze(-1) + torch.arange(T, device=start.device)  # (N, T) or (3, N, T)
    first_lp, first_ent = _token_logp(logits[inverse, None], batch.responses[:, :1], temperature, entropy)
    live = batch.attention_mask[:, P:].bool()  # (N, T) the attended response tokens
    packed = packed_responses(model, cache, batch.responses, live, batch.attention_mask[:, :P], positions)
    if packed is not None:  # the real tokens only (seqrl.algorithms.packed)
        hidden, rows, cols = packed
        nxt = torch.nn.functional.pad(live[:, 1:], (0, 1))[rows, cols]  # (R,) tokens followed by a response token
        rows, cols = rows[nxt], cols[nxt]
        lp, en = _token_logp(model.lm_head(hidden[nxt]), batch.responses[rows, cols + 1], temperature, entropy)
        rest_lp = lp.new_zeros(N, T - 1).index_put((rows, cols), lp)  # (N, T-1)
        rest_ent = en.new_zeros(N, T - 1).index_put((rows, cols), en) if entropy else None
    else:
        out = model(input_ids=batch.responses, attention_mask=batch.attention_mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        rest_lp, rest_ent = _token_logp(out.logits[:, :-1], batch.responses[:, 1:], temperature, entropy)
    ent = torch.cat([first_ent, rest_ent], 1) if entropy else None
    return torch.cat([first_lp, rest_lp], 1), ent, {}


def response_logprobs(policy, batch, temperature: float, entropy: bool = False, buckets: int = 1):
    """Per-token log pi(y_t | y_<t) of the response at `temperature`, optionally the token entropy, and the
    router metrics (moe; token-weighted over forwards). Returns ((N, T), (N, T) | None, dict).

    Positions past a row's kept width get log-prob 0 (they are outside every mask).
    """
    N, T = batch.response_mask.shape
    order = batch.attention_mask[:, batch.prompt_len:].sum(1).argsort() if buckets > 1 else torch.arange(N)
    parts, ents, router = [], [], []
    for rows in order.chunk(max(1, min(buckets, N))):
        sub, t = trim_padding(batch if buckets <= 1 else batch.select(rows))
        logp, ent, metrics = _shared_prompts(policy, sub, temperature, entropy) or _full(policy, sub, temperature,
                                                                                          entropy)
        parts.append(torch.nn.functional.pad(logp, (0, T - t)))  # (n, T)
        ents.append(None if ent is None else torch.nn.functional.pad(ent, (0, T - t)))
        router.append((metrics, float(sub.attention_mask.sum())))
    inverse = order.argsort()  # (N,) back to the batch's row order
    logp = torch.cat(parts)[inverse]  # (N, T)
    return logp, torch.cat(ents)[inverse] if entropy else None, weighted_metrics(router)
