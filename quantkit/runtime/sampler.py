"""Logits to tokens on the device, and the acceptance rule of speculative decoding.

Everything is batched over rows; the only Python loops run over rows that carry their own
``torch.Generator`` (a seeded request), never over the vocabulary, and nothing reads a value back
to the host. Sampling uses the exponential race: ``argmax(p / E)`` with ``E ~ Exponential(1)``
i.i.d. picks token ``i`` with probability ``p_i / sum(p)``, so one noise draw per row replaces a
``multinomial`` call and a seeded row's draw depends on its generator alone, not on its batch.

Interface notes beyond the brief: ``process`` and ``probs`` expose the processed distribution
(the speculative-decoding verifier needs the target's and draft's), and ``rejection_sample``
takes an optional ``greedy`` row mask and ``draft_probs=None`` for a deterministic proposer
(n-gram lookup), whose draft distribution is a point mass on its token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from quantkit.runtime.sampling_params import SamplingParams

Generators = Sequence[torch.Generator | None]


class Sampler:
    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row of ``logits`` (B, V).

        Returns ``(token_ids (B,) int64, logprobs (B,) float32)``. A sampled row's logprob is that
        of its token under the distribution it was drawn from (after temperature, top-k, top-p
        and min-p); a greedy row's is under the plain softmax of its logits.
        """
        greedy = [p.temperature == 0 for p in params]
        logprobs = self.process(logits, params).log_softmax(dim=-1)
        argmax = logprobs.argmax(dim=-1)
        if all(greedy):
            tokens = argmax
        else:
            sampled = [not g for g in greedy]
            tokens = _race(logprobs.exp(), generators, sampled)
            if any(greedy):
                tokens = torch.where(_row_mask(greedy, logits.device), argmax, tokens)
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)

    def process(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Float32 logits after temperature, top-k, top-p, min-p (dropped tokens at -inf).

        Greedy rows come back unchanged (temperature 1, no filters).
        """
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(params)} params")
        logits = logits.float()
        vocab = logits.shape[1]
        active = [p for p in params if p.temperature != 0]
        if any(p.temperature != 1 for p in active):
            temps = [p.temperature if p.temperature != 0 else 1.0 for p in params]
            logits = logits / _column(temps, logits.device)
        top_k = [p.top_k if p.temperature != 0 and 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p if p.temperature != 0 and p.top_p < 1 else 2.0 for p in params]
        if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0 for p in active):
            min_p = [p.min_p if p.temperature != 0 else 0.0 for p in params]
            logits = _min_p(logits, min_p)
        return logits

    def probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution ``sample`` draws each row from (B, V); one-hot on greedy rows."""
        probs = self.process(logits, params).softmax(dim=-1)
        greedy = [p.temperature == 0 for p in params]
        if any(greedy):
            one_hot = torch.zeros_like(probs).scatter_(1, probs.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(_row_mask(greedy, probs.device).unsqueeze(1), one_hot, probs)
        return probs

    def rejection_sample(self, target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                         draft_tokens: torch.Tensor, generators: Generators,
                         greedy: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify ``k`` draft tokens per row against the target model (Leviathan et al. 2023).

        target_probs (B, k+1, V): the target's distributions at the k draft positions and one more.
        draft_probs (B, k, V): the distributions the drafts were drawn from; None for a
        deterministic proposer. draft_tokens (B, k). Draft ``i`` is accepted with probability
        ``min(1, p(x)/q(x))``; at the first rejection a token is drawn from
        ``normalize(max(0, p - q))``; if all k pass, a bonus token is drawn from
        ``target_probs[:, k]``. The emitted tokens are then distributed exactly as the target's.
        Greedy rows accept a draft iff it equals the target's argmax and emit the argmax at the
        first mismatch (or as the bonus).

        Returns ``(tokens (B, k+1) int64 padded with -1, counts (B,) int64)``: each row's first
        ``counts`` entries are its accepted drafts followed by one recovered or bonus token.
        """
        batch, k1, _vocab = target_probs.shape
        k = k1 - 1
        device = target_probs.device
        target_probs = target_probs.float()
        draft_tokens = draft_tokens.long()
        greedy = [False] * batch if greedy is None else list(greedy)
        sampled = [not g for g in greedy]
        target_argmax = target_probs.argmax(dim=-1)  # (B, k+1)

        accepted = self._accept(target_probs, draft_probs, draft_tokens, generators, sampled)
        if any(greedy):
            greedy_accept = draft_tokens == target_argmax[:, :k]
            accepted = torch.where(_row_mask(greedy, device).unsqueeze(1), greedy_accept, accepted)
        num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # length of the accepted run

        dist = _recovery_distribution(target_probs, draft_probs, draft_tokens, num_accepted)
        recovered = _race(dist, generators, sampled) if any(sampled) else None
        greedy_pick = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
        if recovered is None:
            recovered = greedy_pick
        elif any(greedy):
            recovered = torch.where(_row_mask(greedy, device), greedy_pick, recovered)

        positions = torch.arange(k + 1, device=device).unsqueeze(0)
        padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
        tokens = torch.where(positions < num_accepted.unsqueeze(1), padded, -1)
        tokens.scatter_(1, num_accepted.unsqueeze(1), recovered.unsqueeze(1))
        return tokens, num_accepted + 1

    @staticmethod
    def _accept(target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                draft_tokens: torch.Tensor, generators: Generators,
                sampled: list[bool]) -> torch.Tensor:
        """(B, k) bool: draft i passes the test u < p(x)/q(x)."""
        k = draft_tokens.shape[1]
        index = draft_tokens.unsqueeze(-1)
        p = target_probs[:, :k].gather(2, index).squeeze(-1)
        q = torch.ones_like(p) if draft_probs is None else draft_probs.float().gather(2, index).squeeze(-1)
        u = _noise(p.shape, p.device, generators, sampled, _uniform)
        return u * q < p  # u*q < p rather than u < p/q: no division, and q = 0 cannot pass by NaN


def _recovery_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                           draft_tokens: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """(B, V) unnormalised weights of each row's last emitted token.

    ``max(0, p - q)`` at the first rejected position, or the target's next distribution when all
    drafts passed. Only the row's own position is gathered, so memory stays O(B * V).
    """
    batch, k1, vocab = target_probs.shape
    k = k1 - 1
    if k == 0:
        return target_probs[:, 0]
    at = num_accepted.clamp(max=k - 1)
    gather_at = at.view(batch, 1, 1).expand(batch, 1, vocab)
    p = target_probs.gather(1, gather_at).squeeze(1)
    if draft_probs is None:
        q = torch.zeros_like(p).scatter_(1, draft_tokens.gather(1, at.unsqueeze(1)), 1.0)
    else:
        q = draft_probs.float().gather(1, gather_at).squeeze(1)
    residual = (p - q).clamp_min(0)
    # p == q leaves nothing, but then the draft is never rejected; guard against rounding.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    all_passed = (num_accepted == k).unsqueeze(1)
    return torch.where(all_passed, target_probs[:, k], residual)


def _race(weights: torch.Tensor, generators: Generators, rows: list[bool]) -> torch.Tensor:
    """Sample index i of each row with probability weights[i] / sum (weights >= 0)."""
    noise = _noise(weights.shape, weights.device, generators, rows, _exponential)
    # A zero draw would turn 0/0 into NaN, which argmax would pick; keep it strictly positive.
    return (weights / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _noise(shape: torch.Size | tuple[int, ...], device: torch.device, generators: Generators,
           rows: list[bool], draw: Callable[[torch.Tensor, torch.Generator | None], None]) -> torch.Tensor:
    """Random (B, n) float32 tensor: each row in ``rows`` from its own generator, or together
    from the default one when it has none. Other rows hold ones and consume no randomness."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for {shape[0]} rows")
    out = torch.ones(shape, device=device)
    shared = [i for i, r in enumerate(rows) if r and generators[i] is None]
    if len(shared) == shape[0]:
        draw(out, None)
    elif shared:
        part = torch.empty((len(shared), shape[1]), device=device)
        draw(part, None)
        out[_to_device(shared, torch.int64, device)] = part
    for i, r in enumerate(rows):
        if r and generators[i] is not None:
            draw(out[i], generators[i])
    return out


def _exponential(t: torch.Tensor, generator: torch.Generator | None) -> None:
    t.exponential_(generator=generator)


def _uniform(t: torch.Tensor, generator: torch.Generator | None) -> None:
    t.uniform_(generator=generator)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keep each row's top_k best tokens, then the smallest head whose mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(rank >= _column(top_k, logits.device), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the best token always has 0 before it: kept
    sorted_logits = sorted_logits.masked_fill(mass_before >= _column(top_p, logits.device), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop tokens with probability below min_p times the row's best (compared in log space)."""
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(_column(min_p, logits.device))
    return logits.masked_fill(logits < floor, float("-inf"))


def _column(values: list[float] | list[int], device: torch.device) -> torch.Tensor:
    return _to_device(values, torch.float32, device).unsqueeze(1)


def _row_mask(values: list[bool], device: torch.device) -> torch.Tensor:
    return _to_device(values, torch.bool, device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queued work (a plain
    ``torch.tensor(..., device=cuda)`` synchronizes the stream, which would stall an engine that
    launches its next step before reading this one's tokens)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
