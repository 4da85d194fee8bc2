"""Batched translation with transformers' ``generate``: left padding, beam or greedy search.

Generation of a sentence stops once its output holds a complete non-empty line (or EOS), since
ALMA's post-processing keeps only the first non-empty line; with beam search a sentence stops
when it has ``num_beams`` finished hypotheses (``early_stopping=True``), which ALMA's own runs
do not set: it only matters when a still-running beam would later have outscored them. Empty input lines give empty outputs without reaching the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from almak.errors import AlmakError
from almak.eval.prompts import Prompt


@dataclass
class GenerationConfig:
    num_beams: int = 5  # ALMA's evaluation setting
    max_new_tokens: int = 256  # ALMA's evaluation setting
    batch_size: int = 8

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise AlmakError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class TranslationResult:
    hypotheses: list[str]
    seconds: float = 0.0
    generated_tokens: int = 0
    raw: list[str] = field(default_factory=list)  # the generated text before post-processing


class _LineComplete:
    """A stopping criterion: a sequence is done once its new text has a non-empty line and a newline."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [("\n" in t.lstrip()) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def translate(
    model,
    tokenizer,
    sources: list[str],
    prompt: Prompt,
    config: GenerationConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> TranslationResult:
    """Translate ``sources``; ``progress(n)`` is called as each batch of n sentences finishes.

    >>> translate(model, tok, ["Hallo Welt"], Prompt("alma", "de", "en"))   # doctest: +SKIP
    TranslationResult(hypotheses=['Hello world'], ...)
    """
    config = config or GenerationConfig()
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    hyps, raw = [""] * len(sources), [""] * len(sources)
    todo = [i for i, s in enumerate(sources) if s.strip()]
    if progress and len(todo) < len(sources):
        progress(len(sources) - len(todo))
    prompts = {i: prompt.build(sources[i], tokenizer) for i in todo}
    # Similar lengths in a batch waste less padding; order is restored on output.
    todo.sort(key=lambda i: len(prompts[i]))
    add_special = not prompt.uses_chat_template  # a chat template already wrote its special tokens
    eos = _stop_ids(tokenizer, model)
    generated_tokens, start = 0, time.perf_counter()
    for b in range(0, len(todo), config.batch_size):
        batch = todo[b : b + config.batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=add_special).to(device)
        prompt_len = enc["input_ids"].shape[1]
        out = model.generate(
            **enc,
            do_sample=False,
            num_beams=config.num_beams,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_LineComplete(tokenizer, prompt_len)]),
            # Stop a sentence's search once it has num_beams finished hypotheses: without this, a
            # degenerate running beam ("1111...") keeps the whole batch going to max_new_tokens.
            early_stopping=config.num_beams > 1,
        )
        new = out[:, prompt_len:]
        generated_tokens += int((~torch.isin(new, torch.tensor(eos + [tokenizer.pad_token_id], device=device))).sum())
        for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
            raw[i] = text
            hyps[i] = prompt.postprocess(text)
        if progress:
            progress(len(batch))
    return TranslationResult(hyps, time.perf_counter() - start, generated_tokens, raw)
