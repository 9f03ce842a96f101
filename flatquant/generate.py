"""Text generation from a (quantized) model through transformers' own loop and KV cache.

Usage:
    texts = generate(model, tokenizer, ["The capital of Germany is"], max_new_tokens=8)   # greedy

`model.generate` runs as for any transformers model. A model of QuantLayers with 4-bit asymmetric per-head K/V
quantizers (the default quant) gets flatquant.cache.QuantKVCache, which keeps only the 4-bit codes; any other
model transformers' DynamicCache, to which each QuantLayer hands its quantized K (after RoPE and its learned
transform) and V. Either way a generated token is the one a full forward over the whole sequence would pick
(tests/test_generate.py).
"""

from __future__ import annotations

import torch


def cache_kwarg(model) -> str:
    """The keyword that hands a model (and its generate) a Cache: `cache` where its forward takes it (transformers
    5.24 here, which deprecates the other), else `past_key_values` (older versions)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def packed_cache_for(model):
    """A QuantKVCache when every decoder layer is a QuantLayer whose K/V quantizers it can hold, else None."""
    from flatquant.adapters import adapter_for
    from flatquant.cache import QuantKVCache, check_spec
    from flatquant.quant_layer import QuantLayer

    try:
        layers = adapter_for(model).layers(model)
        for layer in layers:
            if not isinstance(layer, QuantLayer):
                return None
            check_spec(layer.attn.kq.spec, layer.attn.head_dim, "keys")
            check_spec(layer.attn.vq.spec, layer.attn.head_dim, "values")
    except ValueError:
        return None
    return QuantKVCache()


def default_cuda_graph(device) -> bool:
    """generate()'s cuda_graph=None: the CUDA-graph decoder on a GPU, transformers' loop elsewhere."""
    return torch.device(device).type == "cuda"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, device=None, packed_cache: bool = True,
             cuda_graph: bool | None = None) -> list[str]:
    """Greedy continuations of `prompts` (the new text only), one prompt at a time so that no padding is needed.
    packed_cache=False generates with transformers' DynamicCache even where a QuantKVCache could hold the K/V.
    cuda_graph=True decodes with `fixed_cache_greedy` instead of model.generate: one step captured in a CUDA graph
    per prompt and replayed (on a GPU; elsewhere the same steps eagerly), stopping after the first EOS as greedy
    model.generate does, with the same tokens (tests/test_generate.py). None (the default): the graph on a GPU,
    where eager steps are bound by the host (LLaMA-3-8B shapes on one H200: 78.5 ms an eager step of the W4A4
    model, 4.76 ms from the graph; README), transformers' loop elsewhere."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = device or next(model.parameters()).device
    cuda_graph = default_cuda_graph(device) if cuda_graph is None else cuda_graph
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if ids.numel() == 0:
            raise ValueError("an empty prompt has nothing to continue")
        if cuda_graph:
            new = fixed_cache_greedy(model, ids, max_new_tokens, tokenizer.eos_token_id, packed_cache)[0]
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            cache = packed_cache_for(model) if packed_cache else None
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=pad,
                                 **({cache_kwarg(model): cache} if cache is not None else {}))
            new = seq[0, ids.shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Run `ids` (B, T) into `cache`; the greedy next token of each sequence, (B, 1)."""
    return model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1:].argmax(-1)


@torch.no_grad()
def fixed_cache_greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                       packed_cache: bool = True) -> torch.Tensor:
    """Greedy tokens after `ids` (B, T) (a batch of unpadded prompts of one length): a prefill into a fixed-capacity
    cache of T + max_new_tokens tokens (QuantKVCache(max_length) where `packed_cache_for` would pick the packed cache,
    else transformers' StaticCache), then GreedyDecoder (a CUDA graph on a GPU). Returns (B, ≤ max_new_tokens): cut
    after the first EOS where every sequence has produced one."""
    from transformers import StaticCache

    from flatquant.cache import QuantKVCache

    capacity = ids.shape[1] + max_new_tokens
    packed = packed_cache and packed_cache_for(model) is not None
    cache = QuantKVCache(max_length=capacity) if packed else StaticCache(config=model.config, max_cache_len=capacity)
    first = prefill(model, cache, ids)
    tokens = first
    if max_new_tokens > 1:
        tokens = torch.cat([first, GreedyDecoder(model, cache, first, ids.shape[1])(max_new_tokens - 1)], dim=1)
    if eos_token_id is not None:
        hit = (tokens == eos_token_id).int().cumsum(dim=1) > 0  # at or after each sequence's first EOS
        done = hit.all(dim=0).nonzero()
        if len(done):
            tokens = tokens[:, : int(done[0]) + 1]
    return tokens


def _positions(cache) -> list[torch.Tensor]:
    """The device-side token counters of a fixed-capacity cache's layers: QuantKVLayer.pos, or transformers'
    StaticLayer.cumulative_length."""
    found = [getattr(layer, "pos", None) if getattr(layer, "pos", None) is not None
             else getattr(layer, "cumulative_length", None) for layer in cache.layers]
    if not found or any(not isinstance(t, torch.Tensor) for t in found):
        raise ValueError("greedy_decode needs a prefilled cache that counts its tokens on the device: "
                         "flatquant.cache.QuantKVCache(max_length=...) or transformers' StaticCache")
    return found


class GreedyDecoder:
    """Greedy one-token steps after a prefill, each fed the token the step before picked.

    Usage:
        decoder = GreedyDecoder(model, cache, next_ids, position)   # captures one step in a CUDA graph
        tokens = decoder(16)                                        # (B, 16) greedy tokens, 16 replays

    cache: prefilled with `position` tokens, of fixed capacity (QuantKVCache(max_length=…) or transformers'
    StaticCache); next_ids: (B, 1) the first token to feed (at `position`). With cuda_graph (CUDA only) one step —
    forward, argmax, feeding the token back, moving the position — is captured once and replayed, so the host
    launches nothing per layer; the cache writes and decode attention read their positions on the device, so
    every replay writes and attends where it should. The capture's warm-up step is undone (positions restored;
    what it wrote is overwritten by the first replay). Without cuda_graph the same step runs eagerly (the reference
    the graph is tested against)."""

    def __init__(self, model, cache, next_ids: torch.Tensor, position: int, cuda_graph: bool = True):
        self.cache, self.position, self.capacity = cache, position, cache.get_max_length()  # -1: none
        if 0 < self.capacity <= position:
            raise ValueError(f"the cache is full: {position} tokens of its {self.capacity}")
        key = cache_kwarg(model)
        self.ids = next_ids.reshape(-1, 1).clone()
        self.pos = torch.full_like(self.ids, position)  # the graph reads both buffers: they are updated in place

        def step():
            logits = model(self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1, **{key: cache}).logits
            self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            self.pos.add_(1)

        self.step, self.graph = step, None
        if cuda_graph and self.ids.is_cuda:
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        counters = _positions(self.cache)
        saved = [t.clone() for t in counters], [getattr(layer, "length", None) for layer in self.cache.layers]
        first = self.ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisations, cuBLAS workspaces)
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(counters, saved, first)  # undo the warm-up, so the capture sees the state it replays from
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self._restore(counters, saved, first)  # the capture ran nothing on the device but moved host-side lengths

    def _restore(self, counters, saved, first) -> None:
        for t, s in zip(counters, saved[0]):
            t.copy_(s)
        for layer, length in zip(self.cache.layers, saved[1]):
            if length is not None:
                layer.length = length
        self.ids.copy_(first)
        self.pos.fill_(self.position)

    @torch.no_grad()
    def __call__(self, steps: int, sync: bool = True) -> torch.Tensor:
        """The next `steps` greedy tokens, (B, steps). sync=False leaves a QuantKVCache's host-side lengths behind
        after graph replays (for timing; call cache.sync() afterwards)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.capacity > 0 and self.position + steps > self.capacity:
            raise ValueError(f"{self.position} + {steps} tokens do not fit in the cache's {self.capacity}")
        out = []
        for _ in range(steps):
            self.graph.replay() if self.graph is not None else self.step()
            out.append(self.ids.clone())
        self.position += steps
        if sync and self.graph is not None and hasattr(self.cache, "sync"):
            self.cache.sync()
        return torch.cat(out, dim=1)


def greedy_decode(model, cache, next_ids: torch.Tensor, position: int, steps: int, cuda_graph: bool = True
                  ) -> torch.Tensor:
    """`steps` greedy tokens (B, steps) after a prefill of `position` tokens into a fixed-capacity cache
    (GreedyDecoder, which says how)."""
    return GreedyDecoder(model, cache, next_ids, position, cuda_graph)(steps)
