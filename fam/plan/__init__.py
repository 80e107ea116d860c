"""``fam.plan``: peak device memory and FLOPs of a FAM call on real SDXL / SD 1.5 / SD 2.1
at any size, traced on the meta device through the sampler's own code, for every option
set; ``choose_options`` picks the fastest one within a memory budget.

Modules: :mod:`.trace` (the counting dispatch mode and fused-attention mode),
:mod:`.models` (modules from configs on meta), :mod:`.phases` (one trace per phase),
:mod:`.options` (option sets, safety margin, time model), :mod:`.planner` (plan,
choose_options), :mod:`.cli` (``fam plan``), :mod:`._sampler` (the sampler pieces used).
"""

__all__ = ["DEFAULT", "NothingFits", "Options", "Plan", "Row", "choose_options", "offload_text_encoders",
           "parse_bytes", "plan", "required_memory"]

_WHERE = {"DEFAULT": "options", "Options": "options", "offload_text_encoders": "options", "parse_bytes": "options",
          "required_memory": "options", "NothingFits": "planner", "Plan": "planner", "Row": "planner",
          "choose_options": "planner", "plan": "planner"}


def __getattr__(name):  # lazy: `fam --help` must not import torch through fam.plan.cli
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
