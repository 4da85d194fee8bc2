"""Batched translation: almak's own generation loop (the default), transformers' ``generate``, or vLLM
(:mod:`almak.modeling.engines.vllm`, where ``model`` is a :class:`~almak.modeling.engines.vllm.VllmEngine`).

The engines search the same way: greedy or beam search over the model's log-probabilities, no sampling,
and a sentence stops once its output holds a complete non-empty line (or EOS), since ALMA's
post-processing keeps only the first non-empty line. Empty input lines give empty outputs without
reaching the model.

- ``almak`` (:class:`almak.modeling.engines.decoder.Decoder`): a preallocated KV cache, finished sentences leave
  the batch at once and the next ones take their rows (greedy), so a batch never idles on its longest
  sentence. On CUDA its decode step replays as a CUDA graph unless ``cuda_graphs=False``. Greedy outputs
  equal transformers' (tested). Beam search keeps, per sentence, the ``num_beams`` best running
  hypotheses among the top ``2 * num_beams`` candidates, retires a candidate
  that ends its line (or emits EOS) when it ranks within the top ``num_beams``, scores finished
  hypotheses by log-probability over length (the stop token included), and stops a sentence once it has
  ``num_beams`` finished hypotheses (transformers' ``early_stopping=True``).
- ``hf``: transformers' ``generate`` on left-padded batches with ``early_stopping=True`` for beams
  (without it a degenerate running beam keeps the batch going to ``max_new_tokens``); ALMA's own runs do
  not set it. It runs any architecture transformers runs.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from almak.errors import AlmakError
from almak.modeling.architecture import context_limit
from almak.modeling.engines.decoder import Decoder, check_supported
from almak.modeling.text.prompts import Prompt

ENGINES = ("almak", "hf", "vllm")


@dataclass
class GenerationConfig:
    num_beams: int = 5  # ALMA's evaluation setting
    max_new_tokens: int = 256  # ALMA's evaluation setting
    batch_size: int = 8
    engine: str = "almak"
    cuda_graphs: bool = True  # almak engine on CUDA: replay the decode step as a CUDA graph (False: eager)

    def __post_init__(self):
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise AlmakError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise AlmakError(f"unknown engine {self.engine!r}; choose {' or '.join(ENGINES)}")


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


def stop_ids(tokenizer, generation_config) -> list[int]:
    """The token ids that end an output: the tokenizer's EOS and the generation config's (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


class LineStop:
    """Token-level form of ``_LineComplete``: per vocabulary entry, does its text end a non-empty line?

    A sequence is done once its text, leading whitespace stripped, holds a newline. Each token is decoded
    alone, once; a row carries one flag, "has non-whitespace text yet". A byte-level token holding part of
    a multi-byte character decodes to U+FFFD and counts as text, as the whole character would unless it
    is a Unicode space (U+3000 and the like) opening the output.
    """

    def __init__(self, tokenizer, eos: list[int], vocab_size: int, device):
        pieces = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=True)
        self.newline = torch.tensor(["\n" in p for p in pieces], device=device)
        self.newline_after_text = torch.tensor(["\n" in p.lstrip() for p in pieces], device=device)
        self.text = torch.tensor([bool(p.strip()) for p in pieces], device=device)
        self.eos = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.eos[[i for i in eos if i < vocab_size]] = True

    def __call__(self, tokens: torch.Tensor, has_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(done, has_text after the token) for ``tokens`` appended to rows with ``has_text``."""
        done = self.eos[tokens] | torch.where(has_text, self.newline[tokens], self.newline_after_text[tokens])
        return done, has_text | self.text[tokens]


@torch.inference_mode()
def translate(
    model,
    tokenizer,
    sources: list[str],
    prompt: Prompt,
    config: GenerationConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> TranslationResult:
    """Translate ``sources``; ``progress(n)`` is called as n more sentences finish.

    >>> translate(model, tok, ["Hallo Welt"], Prompt("alma", "de", "en"))   # doctest: +SKIP
    TranslationResult(hypotheses=['Hello world'], ...)
    """
    config = config or GenerationConfig()
    if config.engine == "vllm":  # model is a VllmEngine, with its own tokenizer
        return model.translate(sources, prompt, config, progress)
    if config.engine == "almak":
        check_supported(model)  # before any work, so a refusal names --engine hf at once
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and config.num_beams > vocab:
        raise AlmakError(f"--num-beams {config.num_beams} is more than the model's {vocab} tokens")
    hyps, raw = [""] * len(sources), [""] * len(sources)
    todo = [i for i, s in enumerate(sources) if s.strip()]
    if progress and len(todo) < len(sources):
        progress(len(sources) - len(todo))
    prompts = {i: prompt.build(sources[i], tokenizer) for i in todo}
    # Similar lengths in a batch waste less padding; order is restored on output.
    todo.sort(key=lambda i: len(prompts[i]))
    add_special = not prompt.uses_chat_template  # a chat template already wrote its special tokens
    eos = stop_ids(tokenizer, getattr(model, "generation_config", None))
    lengths = {i: len(n) for i, n in zip(todo, tokenizer([prompts[i] for i in todo],
                                                           add_special_tokens=add_special)["input_ids"])}
    check_context(model, lengths, config.max_new_tokens)
    start = time.perf_counter()
    if not todo:
        outputs = {}
    elif config.engine == "hf":
        outputs = _generate_hf(model, tokenizer, todo, prompts, add_special, eos, config, progress)
    else:
        ids = {i: tokenizer(prompts[i], add_special_tokens=add_special)["input_ids"] for i in todo}
        stop = LineStop(tokenizer, eos, model.config.vocab_size, next(model.parameters()).device)
        search = _greedy if config.num_beams == 1 else _beam_search
        outputs = search(model, stop, todo, ids, config, progress)
    generated_tokens = 0
    for i, tokens in outputs.items():
        generated_tokens += sum(t not in eos and t != tokenizer.pad_token_id for t in tokens)
        raw[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        hyps[i] = prompt.postprocess(raw[i])
    return TranslationResult(hyps, time.perf_counter() - start, generated_tokens, raw)


def check_context(model, lengths: dict[int, int], extra: int, what: str = "--max-new-tokens adds") -> None:
    """Refuse, naming the line, a prompt (``lengths``: line index -> tokens) that with ``extra`` more tokens
    passes the model's context: positions past it give meaningless output, or none."""
    limit = context_limit(model)
    if limit is None or not lengths:
        return
    line = max(lengths, key=lengths.get)
    if lengths[line] + extra > limit:
        raise AlmakError(f"line {line + 1}: its prompt is {lengths[line]} tokens and {what} {extra}, past the "
                         f"model's context of {limit} positions (max_position_embeddings); split the line or "
                         "lower --max-new-tokens")


def _generate_hf(model, tokenizer, todo, prompts, add_special, eos, config, progress) -> dict[int, list[int]]:
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    outputs = {}
    for b in range(0, len(todo), config.batch_size):
        batch = todo[b : b + config.batch_size]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generate continues the last column
        try:
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                            add_special_tokens=add_special).to(device)
        finally:
            tokenizer.padding_side = side
        prompt_len = enc["input_ids"].shape[1]
        out = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],  # not token_type_ids, if any
            do_sample=False,
            num_beams=config.num_beams,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_LineComplete(tokenizer, prompt_len)]),
            early_stopping=config.num_beams > 1,
        )
        for i, tokens in zip(batch, out[:, prompt_len:].tolist()):
            outputs[i] = tokens
        if progress:
            progress(len(batch))
    return outputs


def _decoder_for(model, sentences: list[int], ids, config, rows: int):
    """A Decoder of ``rows`` rows with room for the longest of ``sentences``' prompts and the budget."""

    graphs = config.cuda_graphs and next(model.parameters()).device.type == "cuda"
    return Decoder(model, rows, max(len(ids[i]) for i in sentences) + config.max_new_tokens, graphs=graphs)


def _greedy(model, stop: LineStop, todo, ids, config, progress) -> dict[int, list[int]]:
    """Greedy search; a finished sentence's row goes at once to the next sentence in line."""
    outputs: dict[int, list[int]] = {}
    decoder = _decoder_for(model, todo, ids, config, min(config.batch_size, len(todo)))
    device = decoder.device
    queue = deque(todo)
    row_sentence: list[int] = []
    logits = torch.empty(0, model.config.vocab_size, device=device)
    has_text = torch.zeros(0, dtype=torch.bool, device=device)
    while queue or row_sentence:
        free = decoder.batch - decoder.rows
        if queue and free:
            joining = [queue.popleft() for _ in range(min(free, len(queue)))]
            logits = torch.cat([logits, decoder.add([ids[i] for i in joining])])
            has_text = torch.cat([has_text, torch.zeros(len(joining), dtype=torch.bool, device=device)])
            row_sentence += joining
            for i in joining:
                outputs[i] = []
        tokens = logits.argmax(-1)
        done, has_text = stop(tokens, has_text)
        for i, t in zip(row_sentence, tokens.tolist()):
            outputs[i].append(t)
        done |= torch.tensor([len(outputs[i]) >= config.max_new_tokens for i in row_sentence], device=device)
        if done.any():
            keep = (~done).nonzero().flatten()
            if progress:
                progress(len(row_sentence) - len(keep))
            decoder.keep(keep)
            row_sentence = [row_sentence[k] for k in keep.tolist()]
            tokens, has_text = tokens[keep], has_text[keep]
        logits = decoder.step(tokens) if row_sentence else logits[:0]
    return outputs


def _beam_search(model, stop: LineStop, todo, ids, config, progress) -> dict[int, list[int]]:
    """Beam search over groups of ``batch_size`` sentences; a finished sentence's beams leave the batch."""
    K = config.num_beams
    outputs: dict[int, list[int]] = {}
    # One decoder for every group, so that captured CUDA graphs are reused from group to group.
    decoder = _decoder_for(model, todo, ids, config, min(config.batch_size, len(todo)) * K)
    device = decoder.device
    for b in range(0, len(todo), config.batch_size):
        group = todo[b : b + config.batch_size]
        decoder.keep(torch.zeros(0, dtype=torch.long))  # empty: the last group may leave rows behind
        logits = decoder.add([ids[i] for i in group])
        beams = torch.arange(len(group), device=device).repeat_interleave(K)
        decoder.keep(beams)
        logits = logits[beams]
        # Only the first beam of each sentence is live at the start; the others are its copies.
        scores = torch.full((len(group), K), float("-inf"), device=device)
        scores[:, 0] = 0.0
        has_text = torch.zeros(len(group) * K, dtype=torch.bool, device=device)
        history = torch.zeros(len(group) * K, 0, dtype=torch.long, device=device)
        live = list(group)
        finished: dict[int, list[tuple[float, list[int]]]] = {i: [] for i in group}
        for step in range(config.max_new_tokens):
            vocab = logits.shape[-1]
            total = (scores.view(-1, 1) + torch.log_softmax(logits, dim=-1)).view(len(live), K * vocab)
            top, where = total.topk(2 * K, dim=1)
            parent, token = where // vocab, where % vocab
            rows = parent + torch.arange(len(live), device=device)[:, None] * K
            cand_done, cand_text = stop(token.flatten(), has_text[rows.flatten()])
            cand_done = cand_done.view(len(live), 2 * K).tolist()
            cand_text = cand_text.view(len(live), 2 * K).tolist()
            top_l, rows_l, token_l = top.tolist(), rows.tolist(), token.tolist()
            keep_rows, keep_scores, keep_tokens, keep_text, still = [], [], [], [], []

            def finish(sentence, s, rank):  # candidate ``rank`` of live sentence ``s`` becomes a hypothesis
                tokens = history[rows_l[s][rank]].tolist() + [token_l[s][rank]]
                finished[sentence].append((top_l[s][rank] / len(tokens), tokens))

            for s, sentence in enumerate(live):
                chosen = []
                for rank in range(2 * K):
                    if top_l[s][rank] == float("-inf"):
                        break
                    if cand_done[s][rank]:
                        if rank < K:
                            finish(sentence, s, rank)
                    else:
                        chosen.append(rank)
                    if len(chosen) == K:
                        break
                if not chosen or len(finished[sentence]) >= K or step + 1 == config.max_new_tokens:
                    if len(finished[sentence]) < K:  # out of budget: running beams compete too
                        for rank in chosen:
                            finish(sentence, s, rank)
                    outputs[sentence] = max(finished[sentence], key=lambda f: f[0])[1]
                    if progress:
                        progress(1)
                    continue
                # Fewer than K candidates still running (the rest ended their line outside the top K):
                # the missing beams are copies scored -inf, so they never win a place.
                pad = [chosen[0]] * (K - len(chosen))
                still.append(sentence)
                keep_rows += [rows_l[s][r] for r in chosen + pad]
                keep_scores.append([top_l[s][r] for r in chosen] + [float("-inf")] * len(pad))
                keep_tokens += [token_l[s][r] for r in chosen + pad]
                keep_text += [cand_text[s][r] for r in chosen + pad]
            if not still:
                break
            index = torch.tensor(keep_rows, device=device)
            tokens = torch.tensor(keep_tokens, device=device)
            history = torch.cat([history[index], tokens[:, None]], dim=1)
            has_text = torch.tensor(keep_text, device=device)
            scores = torch.tensor(keep_scores, device=device)
            live = still
            decoder.keep(index)
            logits = decoder.step(tokens)
    return outputs
