"""Progress bars for chapters: ``tqdm.auto``, off in executed notebooks.

In JupyterLab a chapter's long loops show a bar (a widget). When the runner executes a chapter
(``python -m segbook.book run``) it sets ``TQDM_DISABLE=1`` for the kernel, so that the executed
notebook carries no bars: its own bar already shows the progress. tqdm's notebook bar ignores
that variable (it passes ``disable`` explicitly), hence this wrapper.
"""

from __future__ import annotations

import os

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled when ``$TQDM_DISABLE`` is set."""
    from tqdm.auto import tqdm

    if os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false"):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
