"""Pretrained weights without a network: a cached file loads, a missing one fails at once with the fix.

Without this, a hub download with no network retries for about a minute and then shows the raw hub error.
Before a download, :func:`pretrained_or_explain` checks that the Hugging Face hub can be reached (``HF_HUB_OFFLINE``
set, or a TCP connection to ``HF_ENDPOINT`` refused within 2 s, means it cannot; behind an ``HTTPS_PROXY`` it is
assumed reachable); if not, the weights are loaded in the hub's offline mode, from the local cache only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
_TRUE = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether downloads from the Hugging Face hub can be tried (see the module docstring)."""
    if any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # a direct connection says nothing about the proxy
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration: cached files only, no request, no retry."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained_or_explain(
    create: Callable[[], T],
    what: str,
    instead: str = "pretrained: false and weights_path: <a local weights file>",
) -> T:
    """``create()`` (which downloads pretrained weights of ``what``), failing at once without a network.

    Raises:
        OSError: "no network: ..." when the hub cannot be reached and the weights are not cached, naming the
            settings to use ``instead``.
    """
    if hub_reachable():
        return create()
    with _hub_offline():
        try:
            return create()
        except (OSError, RuntimeError) as err:  # hub "not in cache" errors are OSErrors; timm may wrap them
            raise OSError(
                f"no network: the pretrained weights of {what} cannot be downloaded and are not in the local "
                f"cache; use {instead} (or download them once with network; HF_HOME sets the cache). "
                f"Hub said: {(str(err).splitlines() or [type(err).__name__])[0][:200]}"
            ) from None
