"""A progress bar where one is seen live: in Jupyter tqdm's notebook widget, on a terminal its
text bar; in logs (stderr neither a terminal nor Jupyter's) none."""

from __future__ import annotations

import sys

from tqdm import auto as tqdm_auto


def live_bar(total: int, unit: str, initial: int = 0, quiet: bool = False,
             delay_s: float = 0.0) -> tqdm_auto.tqdm:  # fmt: skip
    """A bar over total units, disabled when quiet or where no one would see it live; shown
    only once delay_s has passed (a quick call shows none)."""
    # tqdm.auto takes the widget inside a Jupyter kernel (with ipywidgets), where stderr is
    # no terminal but a bar is still seen live
    in_jupyter = tqdm_auto.notebook_tqdm is not tqdm_auto.std_tqdm
    live = not quiet and (in_jupyter or sys.stderr.isatty())
    return tqdm_auto.tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                          disable=not live, delay=delay_s)  # fmt: skip
