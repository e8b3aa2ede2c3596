"""A server the harness did not start (a production replica, a server a user started by hand): its address only.

`check_served()` asks the server, before any load, whether it answers at all, accepts the key and serves the model
(`GET /v1/models`), so a wrong `--url`, key or model name is one line up front instead of a run of failed requests.
`ExternalGroup` stands where a `ServerGroup` of started processes does: it has the targets, but no processes, no
argv and no start-up, so everything measured from the process (per-process memory, the start-up log) is absent.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil

from harness.errors import UserError

__all__ = ["ExternalGroup", "ServedModel", "base_url", "check_served", "is_local"]


@dataclass
class ServedModel:
    """One entry of the server's `/v1/models` (vLLM's ModelCard)."""

    name: str
    max_model_len: int | None = None  # vLLM reports it; other OpenAI-compatible servers may not


@dataclass
class ExternalGroup:
    """Servers of one model that the harness attached to: `targets` as `ServerGroup.targets`, and no processes."""

    targets: list[tuple[str, str | None]]
    servers: list[Any] = field(default_factory=list)  # no process the harness could watch, sample or stop
    argv: None = None  # the command line is unknown
    startup_s: None = None  # it was running before the harness came


def base_url(url: str) -> str:
    """`http://host:port` from what a user writes (`host:port`, a trailing `/` or `/v1`); one-line error otherwise."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"got {url!r}; expected http://HOST:PORT", key="--url")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UserError(f"got {url!r}: bad port; expected http://HOST:PORT", key="--url") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def check_served(url: str, api_key: str | None, model: str, timeout_s: float = 10.0) -> ServedModel:
    """The entry of `model` in the server's `/v1/models`; a one-line UserError when the server is unreachable,
    refuses the key, does not speak the OpenAI API, or does not serve `model` (the message lists what it serves)."""
    req = urllib.request.Request(url + "/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "the key given" if api_key else "no key (give --api-key)"
            raise UserError(f"{url} refused {given} (HTTP {exc.code})", key="--api-key") from None
        raise UserError(f"{url}/v1/models answered HTTP {exc.code}; expected a vLLM OpenAI-compatible server",
                        key="--url") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach {url}: {reason}", key="--url") from None
    except ValueError:
        raise UserError(f"{url}/v1/models did not answer JSON; expected a vLLM OpenAI-compatible server",
                        key="--url") from None
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list):
        raise UserError(f"{url}/v1/models has no model list; expected a vLLM OpenAI-compatible server",
                        key="--url")
    served = [ServedModel(str(c.get("id")), _int(c.get("max_model_len"))) for c in cards if isinstance(c, dict)]
    for card in served:
        if card.name == model:
            return card
    names = ", ".join(c.name for c in served) or "none"
    raise UserError(f"{url} does not serve {model!r}; it serves: {names}", key="--model")


def is_local(url: str) -> bool:
    """Does `url` point at this machine (loopback or one of its interface addresses)? Only then does this host's
    NVML see the server's GPUs."""
    host = urlsplit(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    mine = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    for addr in addrs:
        addr = addr.split("%")[0]
        try:
            if ipaddress.ip_address(addr).is_loopback or addr in mine:
                return True
        except ValueError:
            continue
    return False


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
