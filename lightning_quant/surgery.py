"""Module surgery: find what to quantize, swap it in place, and describe what was done.

:func:`inject_quantizers` is the plain-torch entry point the callbacks use too. It

* replaces every ``nn.ReLU`` / ``nn.ReLU6`` *slot* (an attribute or container entry of a parent) by an
  :class:`~lightning_quant.quantizers.base.ActivationQuantizer` with one set of learned values per *call site*: the
  number of places the parent's class calls ``self.<name>(...)``, read from its source with :mod:`ast` (no tracing, so
  control flow in ``forward`` is fine). Container entries (``nn.Sequential``) are one site each, and a module
  instance that sits in two slots gets two quantizers;
* turns every ``nn.Linear`` / ``nn.Conv*d`` (exact types) into its twin in :mod:`lightning_quant.layers` in place
  (same object, same ``weight``/``bias`` Parameters), so parameter names and every reference stay valid;
* gives each new quantizer the trainability of the layer it belongs to: a weight quantizer that of its layer's
  weight, an activation quantizer that of the module that calls it (a frozen backbone keeps frozen clips);
* leaves alone what ``skip`` names, and applies the first/last-layer policy in execution order, found by a dry run
  on the example input (module registration order without one);
* warns, naming the class and line, about functional activations (``F.relu``) that can not be swapped.

The model remembers its recipe in a uint8 buffer ``lightning_quant_recipe`` (its JSON text), which makes injection
idempotent and puts the recipe in the model's ``state_dict``: any checkpoint of the model, even a weights-only one,
says how to rebuild it.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_quant.config import QuantConfig, recipe_difference
from lightning_quant.layers import QUANTIZED_LAYERS, is_hf_conv1d, swap_layer, twin_class
from lightning_quant.quantizers.base import ActivationQuantizer, ResetCallSites

#: Name of the buffer holding an injected model's recipe, and so its key in the model's ``state_dict``.
RECIPE_KEY = "lightning_quant_recipe"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_FUNCTIONAL_ACTIVATIONS = {"relu", "relu_", "relu6"}


@dataclass
class PlanEntry:
    """What the surgery did at one place of the model.

    Args:
        name: Dotted module name.
        kind: ``"activation"`` or ``"weight"``.
        bits: Bit width, or None when the place stays float.
        sites: Number of call sites (activations only).
        quantizer: Class name of the quantizer placed there, or ``""``.
        reason: Why the place stays float or takes other bits (``"first layer"``, ``"skip"``...), or ``""``.
    """

    name: str
    kind: str
    bits: int | None
    sites: int = 1
    quantizer: str = ""
    reason: str = ""
    site_bits: list[int | None] | None = None
    #: Weight layers: bits of the input as it reaches the layer (None: float), and what puts it on that grid.
    input_bits: int | None = None
    input_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["site_bits"] = None if self.site_bits is None else list(self.site_bits)
        return data

    def bits_text(self) -> str:
        if self.site_bits is not None:
            return ",".join("float" if b is None else str(b) for b in self.site_bits)
        return "float" if self.bits is None else str(self.bits)


@dataclass
class QuantizationPlan:
    """Every place considered, in module registration order, plus the warnings raised on the way."""

    entries: list[PlanEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: How "first" and "last" were found: ``"execution"`` (a dry run on ``example_input``) or ``"registration"``.
    order: str = "registration"

    @property
    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.bits is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": [e.to_dict() for e in self.entries],
            "warnings": list(self.warnings),
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationPlan:
        entries = [PlanEntry(**e) for e in data["entries"]]
        return cls(entries, list(data.get("warnings", [])), data.get("order", "registration"))

    def structure(self) -> list[tuple]:
        """What decides the model's parameter layout and numerics (used to check a checkpoint against a model)."""
        return [(e.name, e.kind, e.bits, e.sites, e.site_bits, e.input_bits, e.input_note) for e in self.entries]

    def format(self, title: str = "lightning_quant plan") -> str:
        """A table: one row per place, in registration order, saying what it is quantized to and why."""
        rows = [("module", "what", "bits", "quantizer", "input", "note")]
        for e in self.entries:
            what = "weight" if e.kind == "weight" else f"output ({e.sites} site{'s' if e.sites > 1 else ''})"
            given = "" if e.kind != "weight" else ("float" if e.input_bits is None else str(e.input_bits))
            if e.kind == "weight" and e.input_note:
                given = f"{given} ({e.input_note})"
            rows.append((e.name, what, e.bits_text(), e.quantizer, given, e.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = [title] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        how = (
            "found by a dry run on example_input_array"
            if self.order == "execution"
            else "by module registration order (set `example_input_array` on the model for execution order)"
        )
        lines.append(f"  (first/last layers {how}; functional activations stay float)")
        return "\n".join(lines)


def encode_recipe(recipe: dict[str, Any]) -> torch.Tensor:
    """The recipe as a uint8 tensor of its JSON text (a tensor, so state-dict code that calls ``.clone()``,
    ``.cpu()`` or ``.to(device)`` on every value keeps working, and ``weights_only`` loading accepts it)."""
    return torch.tensor(list(json.dumps(recipe, sort_keys=True).encode()), dtype=torch.uint8)


def decode_recipe(data: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`encode_recipe`."""
    return json.loads(bytes(data.detach().cpu().tolist()).decode())


def _normalized(recipe: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(recipe, sort_keys=True))  # tuples become lists, as after a round trip


class _LoadRecipe:
    """Load pre-hook of an injected model: refuse a state dict written with another recipe, with a clear message.

    A small class rather than a closure, so the model still pickles (``ddp_spawn``) and deep-copies.
    """

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        error_msgs: list[str] = args[-1]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + RECIPE_KEY
        if key not in state_dict or not isinstance(state_dict[key], torch.Tensor):
            return
        saved, mine = decode_recipe(state_dict[key]), injected_recipe(module)
        if mine is None:
            return
        if saved.get("config") != mine["config"]:
            state_dict.pop(key)
            error_msgs.append(
                f"the state dict was written with another quantization recipe than this model's"
                f" ({recipe_difference(saved.get('config') or {}, mine['config'])}). Resume with the same quantization"
                " arguments, or rebuild the model from its checkpoint with"
                " `lightning_quant.load_from_checkpoint(YourModule, path)`."
            )
        else:  # same recipe: the model takes the state dict's (its plan text, e.g. warnings, may differ in length)
            module._buffers[RECIPE_KEY] = state_dict[key].detach().clone().to(module._buffers[RECIPE_KEY].device)


def _attach_recipe(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Store the recipe in the model as the buffer :data:`RECIPE_KEY` (so it is in every ``state_dict``, even of a
    weights-only checkpoint) and guard loading with :class:`_LoadRecipe`. Not a submodule: an ``nn.Sequential``
    model must not call it."""
    model.register_buffer(RECIPE_KEY, encode_recipe(recipe))
    model.register_load_state_dict_pre_hook(_LoadRecipe())


def _slots(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """Every (full name, parent, attribute, child) in registration order, shared children once per slot."""
    slots = []
    seen_parents: set[int] = set()

    def walk(prefix: str, parent: nn.Module) -> None:
        if id(parent) in seen_parents:
            return
        seen_parents.add(id(parent))
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            slots.append((name, parent, attr, child))
            walk(name, child)

    walk("", model)
    return slots


def _class_sources(cls: type) -> list[tuple[type, ast.AST]]:
    """Parsed source of ``cls`` and of its user-defined bases (torch's own classes are skipped)."""
    trees = []
    for klass in cls.__mro__:
        module = getattr(klass, "__module__", "") or ""
        if klass in (nn.Module, object) or module.startswith(("torch.", "lightning.", "pytorch_lightning.")):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            trees.append((klass, ast.parse(source)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
    return trees


def _methods(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """``(name of the first argument, function node)`` for each method of the parsed class."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.args.args:
                    out.append((item.args.args[0].arg, item))
            break
    return out


def _calls_on_self(function: ast.AST, self_name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == self_name
    ]


def count_call_sites(parent: nn.Module, attr: str) -> int | None:
    """How many places of ``parent``'s class call ``self.<attr>(...)``; None when its source can not be read.

    Every method of the class counts (torchvision's ResNet calls its activations from ``_forward_impl``). A loop
    over one such call is one site: the same line sees the same kind of values.
    """
    for _, tree in _class_sources(type(parent)):
        count = sum(
            1
            for self_name, method in _methods(tree)
            for call in _calls_on_self(method, self_name)
            if call.func.attr == attr
        )
        if count:
            return count
    return None


def find_functional_activations(model: nn.Module) -> list[str]:
    """Describe every ``F.relu(...)``-style call in the model's classes: those activations can not be swapped."""
    found = []
    seen: set[type] = set()
    for module in model.modules():
        if type(module) in seen:
            continue
        seen.add(type(module))
        for klass, tree in _class_sources(type(module)):
            for self_name, method in _methods(tree):
                module_calls = {id(c) for c in _calls_on_self(method, self_name)}
                for node in ast.walk(method):
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                        continue
                    if node.func.attr not in _FUNCTIONAL_ACTIVATIONS or id(node) in module_calls:
                        continue
                    call = ast.unparse(node.func)
                    found.append(f"{klass.__qualname__}.{method.name} calls `{call}(...)`")
    return found


def _trainability(model: nn.Module) -> dict[str, bool | None]:
    """For each module name: whether any parameter under it is trainable (None: it has no parameters)."""
    out: dict[str, bool | None] = {}
    for name, module in model.named_modules():
        flags = [p.requires_grad for p in module.parameters()]
        out[name] = any(flags) if flags else None
    return out


def _caller_trainable(name: str, trainable: dict[str, bool | None]) -> bool:
    """Whether the activation at ``name`` belongs to trainable code: the nearest enclosing module with parameters
    decides (a ``requires_grad_(False)`` backbone freezes the clips inside it)."""
    parts = name.split(".")[:-1]
    while parts:
        flag = trainable.get(".".join(parts))
        if flag is not None:
            return flag
        parts.pop()
    flag = trainable.get("")
    return True if flag is None else flag


def _is_weight_target(module: nn.Module, config: QuantConfig) -> bool:
    """A weight layer the recipe covers: an instance of its weight types (subclasses included), or transformers'
    ``Conv1D`` where it covers ``nn.Linear``; not a layer already quantized nor one whose forward is never called."""
    if twin_class(module) is None:
        return False
    types = tuple(config.weight_types)
    return isinstance(module, types) or (is_hf_conv1d(module) and nn.Linear in types)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_matches(prefix, p) for p in patterns for prefix in prefixes)


def _check_skip(model: nn.Module, patterns: tuple[str, ...]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
            raise ValueError(
                f"`skip` pattern {pattern!r} matches no module of {type(model).__name__}; modules: {shown}."
            )


@dataclass
class _Event:
    name: str
    kind: str  # "activation" or "weight"
    site: int = 0


def _call_model(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, dict):
        model(**example_input)
    elif isinstance(example_input, (tuple, list)):
        model(*example_input)
    else:
        model(example_input)


def _dry_run(model: nn.Module, example_input: Any, handles: list) -> None:
    """One forward on ``example_input`` in eval mode under ``no_grad`` (no BatchNorm statistics move); every module's
    mode is restored and ``handles`` (the hooks that watched the run) are removed after, even if it fails."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode


def _execution_order(
    model: nn.Module, activation_slots: list[tuple[str, int]], weight_slots: list[str], example_input: Any
) -> list[_Event]:
    """The order in which the activation call sites and weight layers run on ``example_input``.

    The dry run is in eval mode under ``no_grad`` (no BatchNorm statistics move) and every mode is restored after.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    events: list[_Event] = []
    by_module: dict[int, list[tuple[str, str, int]]] = {}
    for name, sites in activation_slots:
        by_module.setdefault(id(modules[name]), []).append((name, "activation", sites))
    for name in weight_slots:
        by_module.setdefault(id(modules[name]), []).append((name, "weight", 1))
    calls: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        slots = by_module[id(module)]
        k = calls.get(id(module), 0)
        calls[id(module)] = k + 1
        if len(slots) == 1:
            name, kind, sites = slots[0]
            events.append(_Event(name, kind, k % sites))
        else:  # one instance in several slots (an nn.Sequential holding the same ReLU twice): one site each
            name, kind, _ = slots[k % len(slots)]
            events.append(_Event(name, kind, 0))

    # One hook per module instance; `by_module` already maps an instance to every slot it sits in.
    by_id = {id(modules[name]): modules[name] for name in (*dict(activation_slots), *weight_slots)}
    handles = [module.register_forward_pre_hook(hook) for module in by_id.values()]
    _dry_run(model, example_input, handles)
    return events


def _edges_by_execution(events: list[_Event]) -> tuple[str | None, str | None, dict[tuple[str, int], str]] | None:
    """First layer, last layer and the edge role of each activation site, from a dry run's events."""
    weight_positions = [i for i, e in enumerate(events) if e.kind == "weight"]
    if not weight_positions:
        return None
    first, last_at = weight_positions[0], weight_positions[-1]
    last_name = events[last_at].name
    before_last = [i for i in weight_positions if i < last_at and events[i].name != last_name]
    feeds_last_from = before_last[-1] if before_last else -1
    roles: dict[tuple[str, int], set[str]] = {}
    for i, event in enumerate(events):
        if event.kind != "activation":
            continue
        role = ""
        if i > last_at:
            role = "after the last layer"
        elif feeds_last_from < i < last_at:
            role = "feeds the last layer"
        elif i < first:
            role = "before the first layer"
        roles.setdefault((event.name, event.site), set()).add(role)
    # A site that also feeds a middle layer somewhere (a loop, a shared block) is quantized.
    edges = {key: "" if "" in found else sorted(found)[0] for key, found in roles.items()}
    return events[first].name, last_name, edges


#: Modules whose output stays on their input's grid (they select, reshape or pass values through).
_GRID_PRESERVING = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


def _grid_fed_layers(model: nn.Module, example_input: Any) -> dict[str, bool]:
    """Dry run (eval, ``no_grad``): for each quantized layer called, whether every call's input came straight out of a
    quantized activation site (or out of a grid-preserving module fed by one) -- or is not floating (indices).

    Tensors are tracked by storage (a ``Flatten`` is a view of its input) and kept alive for the run, so a freed
    tensor's memory can not pass for a quantized one.
    """
    on_grid: list[torch.Tensor] = []
    pointers: set[int] = set()
    fed: dict[str, bool] = {}

    def mark(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            on_grid.append(t)
            pointers.add(t.untyped_storage().data_ptr())

    def is_on_grid(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and (not t.is_floating_point() or t.untyped_storage().data_ptr() in pointers)

    def after_site(module: ActivationQuantizer, args: tuple, output: Any) -> None:
        site = 0 if module.num_sites == 1 else (module._next_site - 1) % module.num_sites
        if module.bits_at(site) is not None:
            mark(output)

    def after_preserving(module: nn.Module, args: tuple, output: Any) -> None:
        if args and is_on_grid(args[0]):
            mark(output)

    handles = []
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            handles.append(module.register_forward_hook(after_site))
        elif isinstance(module, _GRID_PRESERVING):
            handles.append(module.register_forward_hook(after_preserving))
        elif isinstance(module, QUANTIZED_LAYERS):
            names[id(module)] = name

            def before_layer(module: nn.Module, args: tuple) -> None:
                name = names[id(module)]
                fed[name] = fed.get(name, True) and bool(args) and is_on_grid(args[0])

            handles.append(module.register_forward_pre_hook(before_layer))
    _dry_run(model, example_input, handles)
    return fed


def _place_input_quantizers(
    model: nn.Module,
    config: QuantConfig,
    plan: QuantizationPlan,
    example_input: Any,
    edge_bits: dict[str, tuple[int | None, str]],
    saved: dict[str, tuple[int | None, str]] | None = None,
) -> None:
    """Give every quantized layer whose input is not on a grid yet an ``input_quantizer`` (the recipe's kind).

    ``edge_bits`` maps a layer name to its input's bits under the first/last policy (None: stays float). ``saved``
    (a checkpoint's plan: name -> (input bits, note)) replays earlier decisions instead of a new dry run, so a model
    rebuilt without its example input gets the same structure.
    """
    modules = dict(model.named_modules())
    layers = [e for e in plan.entries if e.kind == "weight" and e.bits is not None and e.name in modules]
    if saved is not None:
        for entry in layers:
            entry.input_bits, entry.input_note = saved.get(entry.name, (None, ""))
            if (
                entry.input_bits is not None
                and entry.input_note == config.make_input(entry.input_bits).__class__.__name__
            ):
                layer = modules[entry.name]
                quantizer = config.make_input(entry.input_bits).train(layer.training)
                if not layer.weight.requires_grad:
                    quantizer.requires_grad_(False)
                layer.input_quantizer = quantizer
        return
    fed: dict[str, bool] | None = None
    if example_input is not None:
        try:
            fed = _grid_fed_layers(model, example_input)
        except Exception as err:  # never stop training for the dry run: quantize every input instead, and say so
            plan.warnings.append(
                f"{type(model).__name__}: the input dry run failed ({err!r}); every layer input is quantized."
            )
    if fed is None:
        plan.warnings.append(
            f"{type(model).__name__}: without `example_input_array` every quantized layer's input gets its own"
            " quantizer, even where a quantized activation already feeds it; set `example_input_array` to avoid"
            " the second rounding."
        )
    for entry in layers:
        layer = modules[entry.name]
        bits, reason = edge_bits.get(entry.name, (config.act_bits, ""))
        if isinstance(layer, nn.Embedding):
            continue  # its input is indices
        if bits is None:
            entry.input_bits, entry.input_note = None, reason or "act_bits=None"
            continue
        if fed is not None and entry.name not in fed:
            entry.input_note = "not called by the dry run"
            plan.warnings.append(
                f"{entry.name}: its weight is quantized but the dry run never called its forward (a parent passes its"
                " weight to a function directly?), so its input stays float."
            )
            continue
        if fed is not None and fed[entry.name]:
            entry.input_bits, entry.input_note = bits, "a quantized activation"
            continue
        quantizer = config.make_input(bits).train(layer.training)
        if not layer.weight.requires_grad:
            quantizer.requires_grad_(False)
        layer.input_quantizer = quantizer
        entry.input_bits, entry.input_note = bits, type(quantizer).__name__


@dataclass
class _Edges:
    """Where the first/last-layer policy applies: found by a dry run (execution order) or by registration order."""

    order: str
    first_weight: str | None
    last_weight: str | None
    of_site: dict[tuple[str, int], str]
    warnings: list[str] = field(default_factory=list)


def _find_edges(
    model: nn.Module,
    slots: list[tuple[str, nn.Module, str, nn.Module]],
    activation_slots: list[tuple[str, int]],
    weight_names: list[str],
    example_input: Any,
) -> _Edges:
    """The first and last weight layers and each activation site's edge, by execution order when a dry run works."""
    if example_input is not None:
        try:
            found = _edges_by_execution(_execution_order(model, activation_slots, weight_names, example_input))
        except Exception as err:  # a dry run that fails must not stop training: fall back, and say so
            edges = _registration_edges(slots, activation_slots, weight_names)
            edges.warnings.append(
                f"{type(model).__name__}: the dry run on example_input failed ({err!r}); first/last layers follow"
                " registration order instead."
            )
            return edges
        if found is not None:
            return _Edges("execution", *found)
    return _registration_edges(slots, activation_slots, weight_names)


def _registration_edges(
    slots: list[tuple[str, nn.Module, str, nn.Module]], activation_slots: list[tuple[str, int]], weight_names: list[str]
) -> _Edges:
    """The fallback without a dry run: modules registered after the second-to-last weight layer feed the last one."""
    first_weight = weight_names[0] if weight_names else None
    last_weight = weight_names[-1] if weight_names else None
    order = {name: i for i, (name, *_rest) in enumerate(slots)}
    last_input_from = order[weight_names[-2]] if len(weight_names) >= 2 else -1
    first_order = order[first_weight] if first_weight else -1
    of_site: dict[tuple[str, int], str] = {}
    for name, sites in activation_slots:
        edge = ""
        if order[name] > last_input_from >= 0:
            edge = "feeds the last layer"
        elif order[name] < first_order:
            edge = "before the first layer"
        for site in range(sites):
            of_site[(name, site)] = edge
    return _Edges("registration", first_weight, last_weight, of_site)


def _policy_bits(config: QuantConfig, bits: int | None, edge: str) -> tuple[int | None, str]:
    """The bits the first/last policy gives a place at ``edge`` (``""``: a middle place), and the reason if changed."""
    if bits is not None and edge == "after the last layer":  # nothing after the last weight layer is quantized
        return None, edge
    if bits is None or not edge or config.first_last == "quantize":
        return bits, ""
    if config.first_last == "8bit":
        return max(bits, 8), edge
    return None, edge


def _swap_activation(
    config: QuantConfig, slot: tuple[str, nn.Module, str, nn.Module], sites: int, edges: _Edges, trainable_caller: bool
) -> PlanEntry:
    """Replace one activation slot by its quantizer (unless every site stays float); return its plan row."""
    name, parent, attr, child = slot
    per_site = [_policy_bits(config, config.act_bits, edges.of_site.get((name, site), "")) for site in range(sites)]
    site_bits = [bits for bits, _ in per_site]
    reasons = sorted({reason for _, reason in per_site if reason})
    reason = "; ".join(f"site {i}: {r}" for i, (_, r) in enumerate(per_site) if r) if sites > 1 else ""
    reason = reason or (reasons[0] if reasons else "")
    if all(bits is None for bits in site_bits):
        return PlanEntry(name, "activation", None, sites, reason=reason or "act_bits=None")
    mixed = len(set(site_bits)) > 1
    bits = max(b for b in site_bits if b is not None)
    quantizer = config.make_activation(child, sites, bits).train(child.training)
    if not trainable_caller:  # never switch on what the quantizer keeps fixed
        quantizer.requires_grad_(False)
    if mixed:
        quantizer.set_site_bits(site_bits)
    setattr(parent, attr, quantizer)
    return PlanEntry(
        name, "activation", bits, sites, type(quantizer).__name__, reason, site_bits=site_bits if mixed else None
    )


def _swap_weight(config: QuantConfig, name: str, layer: nn.Module, edges: _Edges) -> PlanEntry:
    """Turn one weight layer into its quantized twin in place (unless the policy keeps it float); its plan row."""
    edge = "first layer" if name == edges.first_weight else "last layer" if name == edges.last_weight else ""
    bits, reason = _policy_bits(config, config.weight_bits, edge)
    if bits is None:
        return PlanEntry(name, "weight", None, reason=reason or "weight_bits=None")
    weight_quantizer = config.make_weight(layer, name, bits).train(layer.training)
    if not layer.weight.requires_grad:
        weight_quantizer.requires_grad_(False)
    swap_layer(layer, weight_quantizer)  # in place: the layer object stays where it is
    return PlanEntry(name, "weight", bits, 1, type(weight_quantizer).__name__, reason)


def _swap_all(
    model: nn.Module, config: QuantConfig, slots: list, sites_of: dict[str, int], edges: _Edges
) -> QuantizationPlan:
    """Swap every activation slot and weight layer the recipe covers, in slot order; the plan of what was done.

    ``sites_of`` maps each activation slot to its call-site count (read once from the parents' source).
    """
    trainable = _trainability(model)  # read before the swap adds quantizers (trainable by default)
    plan = QuantizationPlan(order=edges.order, warnings=list(edges.warnings))
    twins: dict[int, PlanEntry] = {}
    reset_hooks: dict[int, tuple[nn.Module, list[str]]] = {}
    for slot in slots:
        name, parent, attr, child = slot
        if type(child) in config.activation_types:
            if isinstance(parent, ActivationQuantizer):
                continue
            if _skipped(name, config.skip):
                plan.entries.append(PlanEntry(name, "activation", None, reason="skip"))
                continue
            sites = sites_of[name]
            entry = _swap_activation(config, slot, sites, edges, _caller_trainable(name, trainable))
            if entry.bits is not None and sites > 1:
                reset_hooks.setdefault(id(parent), (parent, []))[1].append(attr)
        elif id(child) in twins:  # a layer shared by two slots stays one layer, quantized once
            first = twins[id(child)]
            entry = PlanEntry(name, "weight", first.bits, 1, first.quantizer, first.reason)
        elif _is_weight_target(child, config):
            skipped = _skipped(name, config.skip)
            entry = (
                PlanEntry(name, "weight", None, reason="skip") if skipped else _swap_weight(config, name, child, edges)
            )
            if entry.bits is not None:
                twins[id(child)] = entry
        elif isinstance(child, QUANTIZED_LAYERS) or isinstance(child, ActivationQuantizer):
            raise ValueError(f"{name} already holds a quantizer but {type(model).__name__} carries no recipe.")
        else:
            continue
        plan.entries.append(entry)
    for parent, attrs in reset_hooks.values():
        parent.register_forward_pre_hook(ResetCallSites(attrs))
    return plan


def _activation_sites(parent: nn.Module, attr: str) -> int:
    """How many call sites an activation slot has: one in a container, else the calls in the parent's source."""
    return 1 if isinstance(parent, _CONTAINERS) else (count_call_sites(parent, attr) or 1)


def _existing_plan(model: nn.Module, recipe: dict[str, Any]) -> QuantizationPlan | None:
    """The plan of a model already injected with ``recipe`` (injection is idempotent); raise for another recipe."""
    existing = injected_recipe(model)
    if existing is None:
        return None
    if existing["config"] != recipe:
        raise ValueError(
            f"{type(model).__name__} already holds quantizers of recipe {existing['config']}; it can not take"
            f" {recipe} as well. Build a fresh model for another recipe."
        )
    return QuantizationPlan.from_dict(existing["plan"])


def inject_quantizers(
    model: nn.Module,
    config: QuantConfig,
    warn: bool = True,
    example_input: Any = None,
    saved_plan: QuantizationPlan | None = None,
) -> QuantizationPlan:
    """Swap quantizers into ``model`` in place, as ``config`` says; calling it again is a no-op.

    Call it before an optimizer is built over ``model.parameters()`` (the callbacks call it in ``setup``), so the new
    parameters (PACT's alpha) are seen by the optimizer, DDP and checkpoints.

    Args:
        model: Any ``nn.Module``; its own Parameters are kept (same objects, same names).
        config: The recipe, e.g. ``PACTConfig(act_bits=4, weight_bits=4)``.
        warn: Emit the plan's warnings with :func:`warnings.warn` (the callbacks emit them on rank zero instead).
        example_input: An input for one dry forward pass (a LightningModule's ``example_input_array``; a tuple is
            unpacked, a dict passed as keywords). With it, "first layer", "last layer" and "feeds the last layer"
            follow execution order, per call site; without it, module registration order, per module.
        saved_plan: A checkpoint's plan: which layers got input quantizers is replayed from it rather than found by a
            new dry run (:func:`lightning_quant.load_from_checkpoint` passes it).

    Returns:
        The plan: every place considered, with its bits, call sites and the reason when it stays float.

    Raises:
        ValueError: If ``model`` was injected with another recipe, a ``skip`` pattern matches nothing, or nothing is
            left to quantize.
    """
    recipe = _normalized(config.to_dict())
    existing = _existing_plan(model, recipe)
    if existing is not None:
        return existing
    _check_skip(model, config.skip)
    functional = find_functional_activations(model)  # read before the swap adds this package's own modules
    slots = _slots(model)
    weight_names = [name for name, *_rest, child in slots if _is_weight_target(child, config)]
    activation_slots = [
        (name, _activation_sites(parent, attr))
        for name, parent, attr, child in slots
        if type(child) in config.activation_types and not isinstance(parent, ActivationQuantizer)
    ]
    edges = _find_edges(model, slots, activation_slots, weight_names, example_input)
    plan = _swap_all(model, config, slots, dict(activation_slots), edges)
    if config.act_bits is not None and config.quantize_inputs and config.make_input(config.act_bits) is not None:
        edge_bits = {
            name: _policy_bits(config, config.act_bits, edge)
            for name, edge in ((edges.first_weight, "first layer"), (edges.last_weight, "last layer"))
            if name is not None
        }
        saved = None if saved_plan is None else {e.name: (e.input_bits, e.input_note) for e in saved_plan.entries}
        _place_input_quantizers(model, config, plan, example_input, edge_bits, saved)
    _disable_fused_paths(model, plan)
    _finish_plan(model, config, plan, functional, warn)
    _attach_recipe(model, {"config": recipe, "plan": plan.to_dict()})
    return plan


def _finish_plan(
    model: nn.Module, config: QuantConfig, plan: QuantizationPlan, functional: list[str], warn: bool
) -> None:
    """Add the functional-activation warnings, refuse a plan that quantizes nothing, and emit the warnings."""
    plan.warnings.extend(
        f"{type(model).__name__}: {where}; functional activations can not be swapped and stay float. Use"
        " nn.ReLU / nn.ReLU6 modules to quantize them."
        for where in functional
    )
    if not plan.quantized:
        kinds = ", ".join(t.__name__ for t in (*config.activation_types, *config.weight_types))
        raise ValueError(
            f"Nothing to quantize in {type(model).__name__}: no {kinds} module is left after `skip`={list(config.skip)}"
            f", act_bits={config.act_bits}, weight_bits={config.weight_bits}, first_last={config.first_last!r}."
        )
    if warn:
        for message in plan.warnings:
            warnings.warn(message, UserWarning, stacklevel=3)


def _disable_fused_paths(model: nn.Module, plan: QuantizationPlan) -> None:
    """Keep the quantized layers on the path that calls them; note the layers torch never calls."""
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if isinstance(module.linear1, QUANTIZED_LAYERS) or isinstance(module.linear2, QUANTIZED_LAYERS):
                # In eval under no_grad this layer takes `torch._transformer_encoder_layer_fwd`, which reads the raw
                # weights and never calls linear1/linear2.forward; this flag is the one condition of that fast path
                # that changes nothing else (the activation function itself is stored separately).
                module.activation_relu_or_gelu = 0
        if isinstance(module, nn.MultiheadAttention):
            plan.warnings.append(
                f"{name} (nn.MultiheadAttention) keeps its projections float: it passes its raw weights to"
                " F.multi_head_attention_forward and never calls its out_proj's forward."
            )


def injected_recipe(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"config": ..., "plan": ...}`` dict of an injected model, or None."""
    data = model._buffers.get(RECIPE_KEY)
    return None if data is None else decode_recipe(data)


def activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    """``(name, module)`` of every activation quantizer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)]


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(layer name, weight quantizer)`` of every quantized layer, in registration order."""
    return [(n, m.weight_quantizer) for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
