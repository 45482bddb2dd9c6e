"""A cache (or cache layer) whose own per-row tensors follow its batch when beam search reorders it."""

from __future__ import annotations

from typing import ClassVar

import torch


class RowState:
    """Mixin before a transformers Cache or cache layer: the attributes named in `row_state`
    (tensors with the batch first, or None) are selected, reordered and repeated with the keys."""

    row_state: ClassVar[tuple[str, ...]] = ()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._each_row_state(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # beam search: rows copied from others
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._each_row_state(lambda t: t.repeat_interleave(repeats, 0))

    def _each_row_state(self, change) -> None:
        for name in self.row_state:
            if (value := getattr(self, name)) is not None:
                setattr(self, name, change(value))
