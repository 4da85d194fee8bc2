"""Teacher-forced scoring: the negative log-likelihood of reference translations under the prompt (reference
perplexity, almak's smooth quality signal), and the pieces training reuses (batches, target logits, target NLL)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.modeling.architecture import context_limit
from almak.modeling.text.prompts import Prompt


@dataclass
class NLL:
    """Teacher-forced negative log-likelihood of the references, in nats per reference token."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)


def teacher_forcing_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int | None):
    """(input_ids, attention_mask, labels) of (prompt ids, target ids) pairs, right-padded so that positions start
    at 0 in every row; labels are -100 on the prompt and the padding, the target ids elsewhere."""
    pad = pad_id if pad_id is not None else 0
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(p + c)
        attn[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return ids, attn, labels


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL (fp32) of the labelled tokens, each predicted from the position before it, and their count."""
    target = labels[:, 1:].to(logits.device)
    mask = target != -100
    return F.cross_entropy(logits[:, :-1][mask].float(), target[mask], reduction="sum"), int(mask.sum())


def target_logits(model, ids: torch.Tensor, attn: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict the labelled tokens, (n, vocab), and those tokens, (n,).

    The vocabulary projection runs only over the positions between the first and the last that predict a target in
    some row (``logits_to_keep``): in training batches the prompts are about half the tokens, and on a 49k
    vocabulary the projection and its logits are a large part of the cost. The logits are the same.
    """
    target = labels[:, 1:].to(ids.device)
    mask = target != -100
    cols = mask.any(0).nonzero().flatten()
    if not len(cols):
        raise ValueError("the batch has no labelled tokens")
    a, b = int(cols[0]), int(cols[-1]) + 1
    try:
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=torch.arange(a, b, device=ids.device)).logits
    except TypeError:  # a model without logits_to_keep: all positions, then the same span
        logits = model(input_ids=ids, attention_mask=attn).logits[:, a:b]
    keep = mask[:, a:b]
    return logits[keep], target[:, a:b][keep]


@torch.inference_mode()
def reference_nll(model, tokenizer, sources: list[str], refs: list[str], prompt: Prompt,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None) -> NLL:
    """NLL of each reference given its prompt; the prompt's tokens are not scored.

    Prompt and continuation are tokenized separately and concatenated (:meth:`Prompt.encode_many`), so the scored
    tokens are exactly the reference's (``prompt.continuation(ref)``), whatever the tokenizer merges. What
    ends the answer (ALMA's newline, EOS) is not scored.
    """
    device = next(model.parameters()).device
    seqs = prompt.encode_many(sources, refs, tokenizer)
    limit = context_limit(model)
    too_long = [i for i, (p, c) in enumerate(seqs) if limit is not None and len(p) + len(c) > limit]
    if too_long:
        i = too_long[0]
        raise AlmakError(f"pair {i + 1}: its prompt and reference are {len(seqs[i][0]) + len(seqs[i][1])} tokens, "
                         f"past the model's context of {limit} positions (max_position_embeddings)")
    total, count = 0.0, 0
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b : b + batch_size]
        ids, attn, labels = teacher_forcing_batch(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        nll, n = target_nll(logits, labels)
        total += float(nll)
        count += n
        if progress:
            progress(len(batch))
    if count == 0:
        raise AlmakError("no reference tokens to score")
    if not math.isfinite(total):
        raise AlmakError("the model produced a non-finite reference NLL (NaN or inf in its logits)")
    return NLL(total, count)
