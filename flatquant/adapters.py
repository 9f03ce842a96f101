"""Where each model family keeps its decoder parts: one table per family, found from config.model_type.

Usage:
    adapter = adapter_for(model)                  # raises for an unsupported architecture
    layers = adapter.layers(model)                # nn.ModuleList of decoder layers
    parts = adapter.parts(layers[0])              # LayerParts: the linears, norms and attention shape

A new LLaMA-like family is one more `Adapter(...)` row in ADAPTERS; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    """Attribute paths of one model family (dotted, relative to the model or to one decoder layer)."""

    name: str
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    rotary_path: str = "model.rotary_emb"
    lm_head_path: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    q_norm: str | None = None
    k_norm: str | None = None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_path)

    def rotary(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.rotary_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)

    def parts(self, layer: nn.Module, config) -> "LayerParts":
        get = layer.get_submodule
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return LayerParts(
            input_norm=get(self.input_norm),
            post_norm=get(self.post_norm),
            linears={k: get(getattr(self, k)) for k in ("q", "k", "v", "o", "gate", "up", "down")},
            q_norm=get(self.q_norm) if self.q_norm else None,
            k_norm=get(self.k_norm) if self.k_norm else None,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            layer_idx=getattr(get(self.q.rpartition(".")[0]), "layer_idx", None),
        )


@dataclass
class LayerParts:
    """The pieces of one decoder layer that quantization touches."""

    input_norm: nn.Module
    post_norm: nn.Module
    linears: dict[str, nn.Linear]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_idx: int | None = None  # the attention's index into a KV cache (transformers' layer_idx)

    def slot_inputs(self) -> dict[str, nn.Linear]:
        """The leader linear of each slotted group (SLOT_LINEARS): its input is the slot's activation (for
        statistics and sizes)."""
        return {slot: self.linears[names[0]] for slot, names in SLOT_LINEARS.items()}


# The topology of every supported decoder layer, written once. GROUPS: the linears that read one quantized
# activation (what the kernels run as one GEMM); the first of each is its leader, which observes that input (GPTQ
# Hessians). SLOTS: where a method may put a transform — qkv, upgate and down on those groups' inputs, heads over the
# head axis before o_proj, v merged into v_proj and o_proj, k on K after RoPE.
GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "upgate": ("gate", "up"), "down": ("down",)}
SLOTS = ("qkv", "upgate", "down", "heads", "v", "k")
SLOT_LINEARS = {g: names for g, names in GROUPS.items() if g in SLOTS}  # the groups whose input has a slot of its own
INPUT_GROUP = {n: g for g, names in GROUPS.items() for n in names}  # linear → the group whose activation it reads
LINEAR_INPUT = {n: g for n, g in INPUT_GROUP.items() if g in SLOT_LINEARS}  # linear → the slot on its input
GROUP_LEADER = {names[0] for names in GROUPS.values()}
GROUP_TRANSFORM = {"qkv": "qkv", "o": "heads", "upgate": "upgate", "down": "down"}  # group → the slot run online on its input


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama"),
    "mistral": Adapter("mistral"),
    "qwen2": Adapter("qwen2"),
    "qwen3": Adapter("qwen3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
}


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or its config), chosen by config.model_type, never by path."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]
