"""Changes as the incident engine sees them: config changes, commits, pushes, deploys and releases.

Plain Python. :func:`change_from_config` reads the data of a ``sophia.config.ConfigChange`` event (topic
``config.changes``, written by the config store's outbox relay); :func:`change_from_external` the data of a
``sophia.external.ExternalEvent`` (topic ``external.events``: GitHub webhooks, the GitHub Events and
``git log`` importers). Each returns a *change record* for :meth:`processors.incidents.incident.
IncidentEngine.feed` (kind ``change``), or None for an event that changes nothing (a comment, a star):

* ``event_time``: when the change took effect, as the event gives it (aware datetime, or epoch ms):
  the config change's ``changed_at``, the external event's ``occurred_at`` (a pushed commit's is its
  push's);
* ``change_id``: the event's CloudEvents id (given by the caller), so a suspect points at the change event;
* ``origin``: ``config`` or the platform (``github``, ``git``);
* ``change_kind``: ``config.CHANGED`` (``config.<ConfigChangeKind>``), ``git.commit``, ``github.push``,
  ``github.deployment...``, ``github.release...``;
* ``summary``: one line for people (``routing.config v3 by alice: raise the pool``, a commit subject);
* ``targets``: the lower-case tokens the change names, matched against the incident's service and pod
  names: a config key's segments (not the free-text reason: ``a/b split`` would name a service ``b``);
  an external event's entity (repository), title, body excerpt and references.

A change *touches* a service when the service's name or one of its pods' names is one of its targets,
e.g. the key ``services.ts-order-service.pool_size`` or a commit titled ``ts-order-service: retry on 503``
touch ``ts-order-service``. That is all the events say about what they touched (a Kubernetes deploy
event naming the workload would be the precise source; none is imported today).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["CHANGE_KINDS_PREFIXES", "change_from_config", "change_from_external", "targets_of"]

CHANGE_KINDS_PREFIXES = ("git.commit", "github.push", "github.deployment", "github.release")
"""External event kinds that change what runs (their prefixes); pull requests, reviews, comments, issues,
stars and forks do not: a merged pull request reaches the branch as its commits and push."""

_TOKEN = re.compile(r"[a-z0-9][a-z0-9_-]*")


def targets_of(*texts: str | None) -> list[str]:
    """The distinct lower-case tokens (letters, digits, ``-`` and ``_``) of ``texts``, in order of
    appearance; ``.``, ``/``, ``#``, ``@``, ``:`` and spaces separate them."""
    seen: dict[str, None] = {}
    for text in texts:
        for token in _TOKEN.findall((text or "").lower()):
            seen.setdefault(token.strip("-_"), None)
    seen.pop("", None)
    return list(seen)


def change_from_config(data: dict[str, Any], event_id: str) -> dict[str, Any]:
    """The change record of a ``sophia.config.ConfigChange`` event's ``data`` (every kind is a change,
    a rollback too: it changes what runs).

    Raises:
        KeyError: a field of the schema is missing.
    """
    kind = str(data["change"])
    summary = f"{data['key']} v{data['version']} ({kind.lower()}) by {data['author']}: {data['reason']}"
    return {
        "event_time": data["changed_at"],
        "change_id": event_id,
        "origin": "config",
        "change_kind": f"config.{kind}",
        "summary": summary[:280],
        "targets": targets_of(data["key"]),
    }


def change_from_external(data: dict[str, Any], event_id: str) -> dict[str, Any] | None:
    """The change record of a ``sophia.external.ExternalEvent`` event's ``data``, or None when its kind is
    not one of :data:`CHANGE_KINDS_PREFIXES`.

    Raises:
        KeyError: a field of the schema is missing.
    """
    kind = str(data["kind"])
    if not kind.startswith(CHANGE_KINDS_PREFIXES):
        return None
    title = data.get("title") or ""
    return {
        "event_time": data["occurred_at"],
        "change_id": event_id,
        "origin": str(data["platform"]),
        "change_kind": kind,
        "summary": f"{data['entity']}: {title}"[:280] if title else str(data["entity"])[:280],
        "targets": targets_of(data["entity"], title, data.get("body_excerpt"), *(data.get("refs") or ())),
    }
