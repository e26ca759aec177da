"""Attention pieces of the GPT: rotary embeddings, the one attention dispatch point, the KV cache.

Window convention (used everywhere in rdn): a layer with window ``w`` lets the query at
position ``i`` see the ``w`` keys at positions ``i - w + 1 .. i`` (itself included);
``window=None`` is plain causal attention over every earlier key. FlashAttention's
``window_size=(left, right)`` counts keys *before* the query, so ``w`` maps to
``(w - 1, 0)`` there.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # FlashAttention-3 (Hopper only); absent on CPU boxes and most installs.
    from flash_attn_interface import flash_attn_func as _fa3_func
except Exception:  # ImportError, or a broken CUDA extension: fall back to SDPA
    _fa3_func = None


# --------------------------------------------------------------------------- rotary

def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[1, seq_len, 1, head_dim // 2]`` (RoFormer, arXiv:2104.09864).

    Channel ``c`` of the first half is rotated together with channel ``c`` of the second half
    at frequency ``base ** (-2c / head_dim)``. Kept in float32; callers cast to the
    activation dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by the tables ``[1, T, 1, D/2]``; returns a new tensor."""
    # chunk, not two slices: the same views forward, but autograd joins the two halves'
    # gradients with one cat, where each slice's backward zero-fills a full-size tensor and
    # the two are then added (eager CPU: ~30% of this function's forward+backward time).
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# --------------------------------------------------------------------------- attention dispatch

@functools.lru_cache(maxsize=64)
def attention_mask(t_q: int, t_k: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[t_q, t_k]`` mask, True = may attend. The queries are the *last* ``t_q``
    positions of the ``t_k`` keys (the KV-cache layout); causal, and within ``window`` if given.
    Built once per (shape, window, device) and cached."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep = keep & (q_pos - k_pos < window)
    return keep


@functools.lru_cache(maxsize=None)
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def fa3_available(q: torch.Tensor) -> bool:
    """FlashAttention-3 runs only when importable, on a Hopper GPU (sm90), in 16-bit."""
    return (_fa3_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and _is_hopper(q.device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention; the single dispatch point of the model.

    ``q``: ``[B, Hq, Tq, D]``; ``k, v``: ``[B, Hkv, Tk, D]`` with ``Tk >= Tq`` and ``Hq`` a multiple
    of ``Hkv`` (grouped-query attention). The queries are the last ``Tq`` of the ``Tk``
    positions, so the same call serves training (``Tq == Tk``) and KV-cache decoding.
    ``key_mask`` (``[B, Tk]`` bool, True = a real token) hides padding keys per row, for
    left-padded batches of prompts of different lengths; a query at a padding position still
    sees itself (its output is never used, but must stay finite: a masked key's weight is 0,
    and 0 x NaN would be NaN). Returns ``[B, Hq, Tq, D]``. Scale is ``1/sqrt(D)``."""
    t_q, t_k = q.size(2), k.size(2)
    if t_k < t_q:
        raise ValueError(f"attention needs at least as many keys as queries (got {t_k} keys, {t_q} queries)")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None (got {window})")
    if key_mask is not None and tuple(key_mask.shape) != (q.size(0), t_k):
        raise ValueError(f"key_mask must have shape [B, Tk] = {(q.size(0), t_k)} (got {tuple(key_mask.shape)})")
    if key_mask is None and fa3_available(q):
        # FA3 takes [B, T, H, D] and aligns a causal mask bottom-right when Tq < Tk.
        out = _fa3_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                        window_size=(-1, -1) if window is None else (window - 1, 0))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    if window is not None:
        # Keys older than the first query's window are invisible to every query: drop them.
        first = max(0, t_k - t_q - window + 1)
        if first:
            k, v, t_k = k[:, :, first:], v[:, :, first:], t_k - first
            if key_mask is not None:
                key_mask = key_mask[:, first:]
        if window >= t_k:  # every remaining key is within every query's window
            window = None
    gqa = q.size(1) != k.size(1)
    build = attention_mask.__wrapped__ if torch.compiler.is_compiling() else attention_mask
    if key_mask is not None:
        q_pos = torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
        own = q_pos == torch.arange(t_k, device=q.device)[None, :]           # [Tq, Tk]
        mask = build(t_q, t_k, window, q.device) & (key_mask[:, None, :] | own)  # [B, Tq, Tk]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)
    if window is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window is None and t_q == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # Under torch.compile the mask is traced into the graph; the Python-side cache is for eager mode.
    mask = build(t_q, t_k, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values for incremental decoding.

    ``k``/``v`` hold ``[n_layer, B, n_kv_head, max_len, head_dim]``; positions ``< pos`` are
    filled. ``GPT.forward(idx, kv_cache=cache)`` treats ``idx`` as the tokens at positions
    ``pos, pos + 1, ...``: each layer writes its new keys/values with :meth:`insert` and
    attends over the filled prefix, and the model calls :meth:`advance` after the last layer.
    Meant for inference (``torch.no_grad``); the cache is written in place.

    Left padding: :meth:`set_padding` marks the first ``pad[b]`` positions of row ``b`` as
    padding; :meth:`key_mask` then hides them from every query (rotary positions are
    relative, so a left-padded prompt attends exactly as it would alone, up to rounding)."""

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.real: torch.Tensor | None = None  # [B, max_len] bool, True = a real token; None = no padding

    def set_padding(self, pad: list[int]) -> None:
        """Row ``b``'s positions ``0 .. pad[b] - 1`` are padding (left padding); all zeros clears it."""
        if len(pad) != self.batch_size:
            raise ValueError(f"set_padding: {len(pad)} pad lengths for a cache of batch {self.batch_size}")
        if not any(pad):
            self.real = None
            return
        positions = torch.arange(self.max_len, device=self.k.device)
        self.real = positions[None, :] >= torch.tensor(pad, device=self.k.device)[:, None]

    def key_mask(self, end: int) -> torch.Tensor | None:
        """``[B, end]`` mask of the real keys at positions ``< end`` (None when nothing is padded)."""
        return None if self.real is None else self.real[:, :end]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """A cache shaped for ``model`` (a :class:`rdn.model.GPT`); ``max_len`` defaults to its
        ``sequence_len``, ``dtype`` to its parameters' dtype."""
        cfg, weight = model.config, model.wte.weight
        return cls(batch_size, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, max_len or cfg.sequence_len,
                   device=weight.device, dtype=dtype or weight.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def n_layer(self) -> int:
        return self.k.size(0)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self) -> None:
        """Forget everything; the buffers are reused (stale values past ``pos`` are never read)."""
        self.pos = 0

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[B, n_kv_head, T, head_dim]`` at ``pos`` for ``layer``; return the
        views of every filled position ``[B, n_kv_head, pos + T, head_dim]``."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {k.size(2)} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def expand(self, batch_size: int) -> "KVCache":
        """A new, independent cache of ``batch_size`` rows, each row of this cache repeated
        ``batch_size // self.batch_size`` times (consecutively), with the same ``pos``.
        Typical use: prefill a prompt once with batch 1, then ``expand(n)`` to draw n samples."""
        if batch_size % self.batch_size:
            raise ValueError(f"expand: batch_size {batch_size} must be a multiple of {self.batch_size}")
        reps = batch_size // self.batch_size
        shape = list(self.k.shape)
        shape[1] = batch_size
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        new.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos].repeat_interleave(reps, dim=1)
        new.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos].repeat_interleave(reps, dim=1)
        new.pos = self.pos
        new.real = None if self.real is None else self.real.repeat_interleave(reps, dim=0)
        return new
