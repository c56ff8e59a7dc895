"""The two kinds of fake quantizer the surgery knows how to place.

An :class:`ActivationQuantizer` takes the place of an activation module (``nn.ReLU``, ``nn.ReLU6``). One module
instance may be called at several places of its parent's ``forward`` (the ResNet ``self.relu`` pattern); each call
site sees a different range, so the quantizer keeps one set of learned values per site and picks the site by the
order of calls. The parent resets that counter through a forward pre-hook (:class:`ResetCallSites`), so nothing in
the user's ``forward`` is patched.

A :class:`WeightQuantizer` maps a layer's weight tensor to its fake-quantized value; the layer wrappers in
:mod:`lightning_quant.layers` call it on every forward and keep the user's own ``weight`` Parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quant.functional.checks import check_bits, check_positive

__all__ = ["ActivationQuantizer", "ResetCallSites", "WeightQuantizer", "check_bits", "check_positive"]


class ActivationQuantizer(nn.Module):
    """Base class of the modules that replace an activation at ``num_sites`` call sites.

    Subclasses implement :meth:`quantize`, which receives the call-site index.

    Args:
        num_sites: How many places of the parent's code call this module. Must be at least 1.

    Raises:
        ValueError: If ``num_sites`` is not a positive int.
    """

    def __init__(self, num_sites: int = 1) -> None:
        super().__init__()
        if not isinstance(num_sites, int) or isinstance(num_sites, bool) or num_sites < 1:
            raise ValueError(f"`num_sites` must be an int >= 1, got {num_sites!r}.")
        self.num_sites = num_sites
        # A plain int, not a buffer: it is bookkeeping for the current forward, never state worth saving.
        self._next_site = 0
        #: Per-site bit widths when they differ from ``self.bits`` (None in the tuple: that site stays float).
        self.site_bits: tuple[int | None, ...] | None = None

    def set_site_bits(self, site_bits: Sequence[int | None]) -> None:
        """Give each call site its own bit width; None keeps a site float (e.g. the input of the last layer).

        Raises:
            ValueError: If the length is not ``num_sites`` or a width is not an int in 1..16.
        """
        site_bits = tuple(site_bits)
        if len(site_bits) != self.num_sites:
            raise ValueError(f"`site_bits` needs {self.num_sites} entries, got {site_bits!r}.")
        for bits in site_bits:
            check_bits(bits, "site_bits", allow_none=True)
        self.site_bits = site_bits

    def site_names(self, name: str) -> list[str]:
        """Names under which this module's per-site values are logged: ``name``, or ``name.site<i>`` for several."""
        return [name] if self.num_sites == 1 else [f"{name}.site{i}" for i in range(self.num_sites)]

    def bits_at(self, site: int) -> int | None:
        """Bit width of one call site (None: float)."""
        return self.bits if self.site_bits is None else self.site_bits[site]

    def upcoming_site(self) -> int:
        """The call site the next forward will use (for forward pre-hooks that look at a site's input)."""
        return self._next_site if self.num_sites > 1 else 0

    def reset_sites(self) -> None:
        """Start counting call sites from the first one again (called before each parent forward)."""
        self._next_site = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.num_sites == 1:
            # The common case touches no Python state, so `torch.compile` sees a pure function.
            site = 0
        else:
            site = self._next_site
            # Wrapping (instead of raising) keeps a loop over one call site on that site's values.
            self._next_site = (site + 1) % self.num_sites
        if self.site_bits is not None and self.site_bits[site] is None:
            return F.relu6(x) if getattr(self, "relu6", False) else F.relu(x)
        return self.quantize(x, site)

    def quantize(self, x: Tensor, site: int) -> Tensor:  # pragma: no cover - abstract
        """Quantize ``x`` at call site ``site``, with ``self.bits_at(site)`` bits."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        sites = f"num_sites={self.num_sites}"
        return sites if self.site_bits is None else f"{sites}, site_bits={self.site_bits}"


class WeightQuantizer(nn.Module):
    """Base class of the modules that map a layer's weight to its fake-quantized value."""

    #: Whether 0 is one of the output levels (a pruned weight stays exactly 0); DoReFa's odd levels have none.
    has_zero_level: bool = False

    def forward(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResetCallSites:
    """Forward pre-hook for a parent module: resets the call-site counters of its activation quantizers.

    A small class instead of a closure so that the hooked model still pickles (``ddp_spawn``, ``copy.deepcopy``).

    Args:
        child_names: Attribute names of the parent's children that are multi-site activation quantizers.
    """

    def __init__(self, child_names: Sequence[str]) -> None:
        self.child_names = tuple(child_names)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for name in self.child_names:
            child = getattr(module, name, None)
            if isinstance(child, ActivationQuantizer):
                child.reset_sites()
