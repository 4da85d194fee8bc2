"""A LLaMA-family forward pass over a preallocated (static) KV cache, for almak's generation loop.

The model's own modules do the work (embeddings, norms, rotary embedding, the q/k/v/o and MLP
projections, whatever surgery put there: QuantLinear, Sparse24Linear), so results match transformers'
forward; what this file replaces is the per-step machinery around them: the cache is one buffer per layer
allocated once, written in place, and read as a view of its filled part; rows that finish are dropped by
moving the live rows to the front of the buffers (``keep``), beams are reordered the same way, and new
prompts join as rows free up (``add``), so a batch stays full while its sentences finish at different times.

>>> dec = Decoder(model, batch=2, max_len=300)                      # doctest: +SKIP
>>> logits = dec.add([[1, 2, 3], [4, 5]])                           # (2, vocab): next-token logits
>>> logits = dec.step(logits.argmax(-1))                            # (2, vocab)

Every row keeps its tokens in key slots ``0..length`` and its positions count from 0, as transformers'
generate numbers left-padded rows; slots past a row's length are masked out of attention.

On CUDA the decode step runs as a CUDA graph (``graphs=True``, the default there): at batch 1, issuing a
7B model's several hundred small kernels one by one from Python takes milliseconds, longer than reading its
int4 weights (about 3.5 GB) takes on an H100. A graph needs
fixed shapes and no host synchronization inside, so the graphed step is the *static* step: it runs a
bucket of rows (the next power of two at or above the live rows, or the whole batch) with inputs copied
into fixed buffers, and attends over all ``max_len`` slots with the same mask. Rows past the live ones
compute on stale inputs and write only to their own free cache rows, which ``add`` overwrites before any
live row reads them. Each bucket is captured once, on its first use, after one eager warm-up run (Triton
autotuning, lazy caches); the warm-up writes the same cache entries as the step it precedes, so capture
changes no result. ``static=True`` runs the same static step eagerly, on any device (tests, the eager
fallback's twin); ``graphs=False`` is the plain eager fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from almak.errors import AlmakError
from almak.modeling.architecture import HINT, check_model_type, context_limit


def check_supported(model) -> None:
    """Refuse models whose layers this forward pass does not reproduce, naming the way out."""
    config = model.config
    check_model_type(getattr(config, "model_type", None))
    hint = HINT
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise AlmakError(f"this model uses sliding-window attention (window {window}), which almak's "
                         f"generation loop does not implement; {hint}")
    gen = getattr(model, "generation_config", None)
    changes = {name: getattr(gen, name, None) for name in ("repetition_penalty", "no_repeat_ngram_size",
                                                           "bad_words_ids", "suppress_tokens")}
    changes = {k: v for k, v in changes.items() if v not in (None, 1.0, 0, [])}
    if changes:
        raise AlmakError(f"the model's generation_config sets {changes}, which almak's generation loop "
                         f"does not apply; {hint}")


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


GENERATION_HINT = "lower --batch-size, --num-beams or --max-new-tokens"


def check_room(need: int, device: torch.device, what: str, hint: str = GENERATION_HINT) -> None:
    """Refuse an allocation that cannot fit, before trying it (a huge --batch-size x --num-beams x
    --max-new-tokens would otherwise die in the allocator, or swap the machine to a halt)."""
    free = free_memory(device)
    if need > free:
        raise AlmakError(f"{what} needs {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free on {device}: {hint}")


def kv_cache_bytes(model, batch: int, max_len: int) -> int:
    """Bytes of :class:`Decoder`'s key and value cache for ``batch`` rows of ``max_len`` positions."""
    config = model.config
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = model.model.embed_tokens.weight.dtype.itemsize
    return 2 * config.num_hidden_layers * batch * n_kv * max_len * head_dim * itemsize


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    """Runs ``model`` (a LlamaForCausalLM or MistralForCausalLM) over up to ``batch`` rows of ``max_len`` tokens.

    Each row holds its own sequence from key slot 0 on, with its own length; rows ``[0, rows)`` are live.
    """

    def __init__(self, model, batch: int, max_len: int, graphs: bool | None = None, static: bool = False):
        check_supported(model)
        self.model = model
        self.layers = model.model.layers
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        limit = context_limit(model)
        if limit is not None and max_len > limit:
            raise AlmakError(f"prompt plus new tokens need {max_len} positions; the model has {limit}")
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        shape = (batch, self.n_kv, max_len, self.head_dim)
        check_room(kv_cache_bytes(model, batch, max_len), self.device,
                   f"the KV cache of {batch} rows x {max_len} positions")
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.batch, self.max_len = batch, max_len
        self.rows = 0
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # filled slots per row
        self.slots = torch.arange(max_len, device=self.device)
        on_cuda = self.device.type == "cuda"
        self.graphs = on_cuda if graphs is None else graphs
        if self.graphs and not on_cuda:
            raise AlmakError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.static = self.graphs or static
        # The static step's fixed inputs; rows past the live ones keep stale but valid values.
        self._tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.buckets = sorted({min(2**i, batch) for i in range(batch.bit_length() + 1)})
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every captured bucket (they never run at once)

    def add(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append rows holding ``prompts`` (token ids); returns each one's next-token logits, (n, vocab).

        The prompts are right-padded into one forward pass; the padding is written to the cache but
        never attended to, since a row's keys end at its length.
        """
        n, longest = len(prompts), max(len(p) for p in prompts)
        if self.rows + n > self.batch or longest >= self.max_len:
            raise AlmakError(f"{n} prompts of up to {longest} tokens do not fit the cache "
                             f"({self.batch - self.rows} free rows of {self.max_len} slots)")
        ids = torch.zeros(n, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        first = self.rows
        self.rows += n
        self.lengths[first : self.rows] = lengths
        positions = self.slots[:longest].expand(n, longest)
        allowed = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        logits = self._forward(ids.to(self.device), positions, allowed[None, None], first, start=0,
                               last=lengths - 1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to every live row; returns the next-token logits, (rows, vocab)."""
        rows = self.rows
        positions = self.lengths[:rows].clone()
        last = int(positions.max())  # one host sync per step
        if last >= self.max_len:
            raise AlmakError(f"the KV cache is full ({self.max_len} positions)")
        self.lengths[:rows] += 1
        if self.static:
            return self._static_step(tokens.view(rows), positions)
        end = last + 1
        allowed = (self.slots[:end] <= positions[:, None])[:, None, None]
        return self._forward(tokens.view(rows, 1), positions[:, None], allowed, 0, start=positions, last=None)

    def keep(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (in that order, repeats allowed: beam reordering), dropping the rest."""
        index = index.to(self.device)
        n = index.numel()
        filled = int(self.lengths[index].max()) if n else 0
        for buf in (*self.k, *self.v):
            buf[:n, :, :filled] = buf[index, :, :filled]
        self.lengths[:n] = self.lengths[index]
        self.rows = n

    def capture(self, rows: int) -> None:
        """Capture now the graph that steps of ``rows`` live rows will replay (a no-op without graphs), so
        that its warm-up and recording stay out of a timed run. Only before the first ``add``: the warm-up
        then writes only to free rows."""
        if self.rows:
            raise AlmakError(f"capture before adding rows; {self.rows} rows are live")
        bucket = self._bucket(rows)
        if self.graphs and bucket not in self._captured:
            self._captured[bucket] = self._capture(bucket)

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The step over the smallest bucket holding the live rows, eagerly or by replaying its graph."""
        rows = tokens.numel()
        bucket = self._bucket(rows)
        self._tokens[:rows] = tokens
        self._positions[:rows] = positions
        if not self.graphs:
            return self._bucket_forward(bucket)[:rows]
        if bucket not in self._captured:
            self._captured[bucket] = self._capture(bucket)
        graph, logits = self._captured[bucket]
        graph.replay()
        return logits[:rows].clone()  # the next replay overwrites the graph's output

    def _bucket(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` rows."""
        return next(b for b in self.buckets if b >= rows)

    def _bucket_forward(self, bucket: int) -> torch.Tensor:
        """One token for each of rows ``0..bucket`` from the fixed buffers, attending over every slot."""
        positions = self._positions[:bucket]
        allowed = (self.slots <= positions[:, None])[:, None, None]
        return self._forward(self._tokens[:bucket, None], positions[:, None], allowed, 0, start=positions,
                             last=None)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm ``bucket``'s step up on a side stream, then record it; returns the graph and its output."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._bucket_forward(bucket)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._bucket_forward(bucket)
        except RuntimeError as e:  # an operation that cannot be recorded: say how to run without graphs
            raise AlmakError(f"recording the decode step of {bucket} rows as a CUDA graph failed ({e}); "
                             f"--no-cuda-graphs (cuda_graphs=False) runs it eagerly") from e
        self._pool = graph.pool()
        return graph, logits

    def _forward(self, input_ids, positions, allowed, first: int, start, last) -> torch.Tensor:
        """Run rows ``first..first+len(input_ids)``; ``start`` is slot 0 (prefill) or each row's slot (step)."""
        inner = self.model.model
        rows, q_len = input_ids.shape
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        live = slice(first, first + rows)
        end = q_len if last is not None else allowed.shape[-1]
        row_ids = torch.arange(first, first + rows, device=self.device)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, q_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if last is not None:  # prefill: the rows' slots 0..q_len
                self.k[i][live, :, :q_len] = k
                self.v[i][live, :, :q_len] = v
            else:  # one token a row, each at its own slot
                self.k[i][row_ids, :, start] = k[:, :, 0]
                self.v[i][row_ids, :, start] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q, self.k[i][live, :, :end], self.v[i][live, :, :end], attn_mask=allowed,
                scale=attn.scaling, enable_gqa=self.n_kv != self.n_heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, q_len, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x[torch.arange(rows, device=self.device), last] if last is not None else x[:, -1]
        return self.model.lm_head(inner.norm(x)).float()
