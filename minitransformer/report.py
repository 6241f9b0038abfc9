"""The parameter report, as the adapter libraries print it: total, trainable, % and the groups."""

BASE_GROUPS = ("embeddings", "attention", "FFN", "LayerNorm", "adapters", "heads")
GROUPS = ("embeddings", "attention", "FFN", "LayerNorm", "adapters", "LoRA", "prefix", "prompt", "biases",
          "heads")
ADAPTER_LEAVES = ("W_down", "b_down", "W_up", "b_up")


def group_of(name):
    """The report group of a dotted parameter name (one of GROUPS)."""
    module, leaf = name.rsplit(".", 2)[-2:]  # the module's own name (attn, ffn, ln1, lora, ...), the array's
    if name.startswith("adapters."):
        if ".head." in name:
            return "heads"
        if module.startswith("ln"):
            return "LayerNorm"  # the adapters' LayerNorm copies, BitFit's beta copies
        if module in ("attn", "ffn") and leaf not in ADAPTER_LEAVES:
            return "biases"  # BitFit's copies of b_q ... b_2
        return {"lora": "LoRA", "prefix": "prefix", "prefix_mlp": "prefix", "prompt": "prompt"}.get(module, "adapters")
    if name.startswith("embed."):
        return "embeddings"
    if module.startswith("ln"):
        return "LayerNorm"
    if "head" in module:
        return "heads"
    return {"attn": "attention", "ffn": "FFN"}[module]


def parameter_groups(model):
    """{group: (total, trainable)} over embeddings, attention, FFN, LayerNorm, adapters, heads,
    and the groups of the other methods (LoRA, prefix, prompt, biases) where the model has any."""
    groups = {g: [0, 0] for g in GROUPS}
    for name, p in model.named_parameters().items():
        g = group_of(name)
        groups[g][0] += p.value.size
        groups[g][1] += p.value.size if p.trainable else 0
    return {g: tuple(v) for g, v in groups.items() if g in BASE_GROUPS or v[0]}


def parameter_report(model):
    """A table like the adapter libraries print: total, trainable, % and the group breakdown."""
    total, trainable = model.num_parameters(), model.num_parameters(trainable_only=True)
    lines = [f"{'group':<12}{'total':>12}{'trainable':>12}",
             *(f"{g:<12}{t:>12,}{tr:>12,}" for g, (t, tr) in parameter_groups(model).items()),
             f"trainable params: {trainable:,} || all params: {total:,} || "
             f"trainable%: {100 * trainable / max(total, 1):.4f}"]
    return "\n".join(lines)
