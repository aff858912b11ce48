"""Source adapters: the mini-swe-agent trajectory importer, Kafka Connect / Debezium tooling, the
Debezium change-event normaliser, and webhook signature checks with event mappers."""

from connectors import agent_runs, debezium, errors, kafka_connect, lint, webhooks
from connectors.agent_runs import *  # noqa: F403
from connectors.debezium import *  # noqa: F403
from connectors.errors import *  # noqa: F403
from connectors.kafka_connect import *  # noqa: F403
from connectors.lint import *  # noqa: F403
from connectors.webhooks import *  # noqa: F403

__all__ = sorted(
    {
        *agent_runs.__all__,
        *debezium.__all__,
        *errors.__all__,
        *kafka_connect.__all__,
        *lint.__all__,
        *webhooks.__all__,
    }
)
