"""Healing: circuit breakers, durable retries, fallbacks, agent health, escalation and config rollback.

The decision logic is plain Python and runs on event time (:class:`processors.healing.healer.Healer`);
every decision is a :class:`processors.healing.decisions.Decision` that the Faust shell publishes as an
event, so a replay of the same history gives the same decisions.
"""
