"""What the model does with its tasks (tasks.py): add, find, activate, train, merge, and put the
active task's pieces into the base's slots before a forward. Transformer inherits these methods;
they are the public API's task half (add_adapter, set_active_adapter, train_adapter, merge, ...).
"""
import numpy as np

from . import sizes
from .configs import AdapterConfig
from .modules import plug
from .tasks import Task, method_of
from .validate import integer


class TaskMethods:
    def add_adapter(self, name, config=None, n_classes=2, seed=0):
        """Add a named task (one per task, with its own classification head): bottleneck adapters
        (AdapterConfig, the default), LoRAConfig, PrefixConfig, PromptConfig or BitFitConfig."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: expected an identifier like 'sentiment', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"name: an adapter called {name!r} exists already")
        config = AdapterConfig() if config is None else config
        method = method_of(config)  # a TypeError naming the configs there are, for anything else
        integer("n_classes", n_classes, least=2)
        integer("seed", seed, least=0)
        n = sizes.adapter_parameter_count(self.config, config, n_classes)
        sizes.check_fits(n * self.dtype.itemsize, f"config: the {method} task ({n:,} parameters)")
        self.adapters[name] = Task(name, config, n_classes, self, np.random.default_rng(seed))
        return self.adapters[name]

    def delete_adapter(self, name):
        if self.get_adapter(name).merged:
            raise ValueError(f"name: {name!r} is merged into the base weights; unmerge({name!r}) first")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def get_adapter(self, name):
        """The Task called `name` (a KeyError naming the adapters there are, if none)."""
        if name not in self.adapters:
            raise KeyError(f"name: expected one of the adapters {sorted(self.adapters)}, got {name!r}")
        return self.adapters[name]

    def set_active_adapter(self, name):
        """Route the forward pass through adapter `name`, or through the bare base (None)."""
        if name is not None:
            self.get_adapter(name)
        merged = [n for n, task in self.adapters.items() if task.merged and n != name]
        if merged:  # the base weights hold that task's update now
            raise ValueError(f"name: task {merged[0]!r} is merged into the base weights; "
                             f"unmerge({merged[0]!r}) before activating {name!r}")
        self.active_adapter = name

    def train_adapter(self, name):
        """Activate adapter `name` and freeze everything else: what trains is its adapters,
        its head and, in the paper's setting (train_layernorm=True), its own LayerNorms
        (or its LoRA matrices, prefix, prompt or bias copies, by method)."""
        if self.get_adapter(name).merged:
            raise ValueError(f"name: {name!r} is merged (its branches are not computed); "
                             f"unmerge({name!r}) before training it")
        self.set_active_adapter(name)
        self.freeze()
        self.unfreeze(f"adapters.{name}.*")

    def merge(self, name):
        """Fold LoRA task `name` into the base weights, W <- W + s A B (Task.merge), and
        activate it: the forward then runs no branch, at exactly the bare base's cost.

        The original arrays are kept, and unmerge(name) puts them back: the base returns bit for
        bit. (W + s A B - s A B would not: each floating-point addition rounds.) While merged,
        the base weights are this task's: activating another task, training, deleting or saving
        the base wait for unmerge.
        """
        task = self.get_adapter(name)
        if task.method != "lora":
            raise ValueError(f"name: expected a LoRA task to merge, got {name!r} (method {task.method!r})")
        if task.merged:
            raise ValueError(f"name: {name!r} is merged already")
        self.set_active_adapter(name)
        task.merge(self)

    def unmerge(self, name):
        """Put back the base weights merge(name) replaced: the very arrays, bit for bit."""
        task = self.get_adapter(name)
        if not task.merged:
            raise ValueError(f"name: {name!r} is not merged")
        task.unmerge(self)

    def drop_prefix_mlp(self, name):
        """Keep prefix task `name`'s computed prefix and drop its reparameterising MLP (tasks.py)."""
        self.get_adapter(name).drop_prefix_mlp()

    # ------------------------------------------------------------------ the active task's pieces in the base

    def _active(self):
        """The active Task, or None for the bare base."""
        return self.adapters[self.active_adapter] if self.active_adapter else None

    def _slots(self):
        """{slot path: (owner, attribute)}: every place a task may put a module of its own."""
        slots = {"front": (self, "front"), "ln_emb": (self, "ln_emb"), "ln_f": (self, "ln_f"),
                 "back": (self, "back")}
        for i, b in enumerate(self.blocks):
            slots.update({f"blocks.{i}.ln1": (b.sub1, "norm"), f"blocks.{i}.ln2": (b.sub2, "norm"),
                          f"blocks.{i}.sub1.adapter": (b.sub1, "adapter"),
                          f"blocks.{i}.sub2.adapter": (b.sub2, "adapter"),
                          f"blocks.{i}.sub2.parallel": (b.sub2, "parallel"), f"blocks.{i}.attn.kv": (b.attn, "kv"),
                          **{f"blocks.{i}.attn.{t}_proj": (b.attn, f"{t}_proj") for t in "qkvo"},
                          **{f"blocks.{i}.ffn.{t}": (b.ffn, t) for t in ("fc1", "fc2")}})
        return slots

    def _plug(self, plugs):
        """Put the modules `plugs` {slot path: module} into their slots, the base's back into every other."""
        for path, (owner, slot) in self._slots().items():
            plug(owner, slot, plugs.get(path))

    def active_parameters(self, head="lm"):
        """{name: Parameter} of exactly what forward(..., head) uses with the active task: the
        base's embeddings and blocks, with the task's own copies in place of the base's
        (LayerNorms, BitFit's biases), its adapters, LoRA branches (not while merged), prefix or
        prompt, and the head `head` selects."""
        task = self._active()
        heads = {self.lm_head, self.cls_head}
        used = [p for m in self._modules.values() if m not in heads for p in m.p.values()]
        if task:
            swapped = task.swapped()
            used = [p for p in used if p.name not in swapped]
            used += [p for m in task.modules()[:-1] if not (task.merged and m in task.lora) for p in m.parameters()]
            used += [p for own in task.copies.values() for p in own.values()]
        used += self._head(head, task).parameters()
        names = {p.name for p in used}
        return {n: p for n, p in self.named_parameters().items() if n in names}

