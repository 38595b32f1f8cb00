"""Knowledge patches: an smft / memory_ft run as the value rows it changed (see :mod:`.format`),
applied, reverted, merged, forgotten (:mod:`.ops`) and audited (:mod:`.audit`)."""

from smft_dist.patching.format import Patch, PatchError
from smft_dist.patching.ops import apply, apply_to_model, apply_to_tables, diff, diff_tables, forget, merge, overlaps

__all__ = ["Patch", "PatchError", "apply", "apply_to_model", "apply_to_tables", "diff", "diff_tables", "forget", "merge", "overlaps"]
