"""Names of the topics the detect app derives from its app id (no faust import: ensure_topics needs them too)."""

from __future__ import annotations


def owners_topic(app_id: str) -> str:
    """The app's repartition topic of owner messages (keyed by beneficial owner id, same partition count as the
    input topics, so the `owners` table and its changelog line up with it)."""
    return f"{app_id}-owners-repartition"


def derived_topics(app_id: str) -> tuple[str, ...]:
    """Topics ensure_topics creates for the app besides the configured ones (faust's changelogs it creates)."""
    return (owners_topic(app_id),)
