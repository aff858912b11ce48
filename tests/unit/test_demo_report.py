"""The demo's incident table names pods by their Kubernetes deployment (``backbone/cli/demo.py``)."""

from __future__ import annotations

import pytest

from backbone.cli.demo import _deployment


@pytest.mark.parametrize(
    ("pod", "deployment"),
    [
        ("ts-contacts-service-866bd68c97-xcqfx", "ts-contacts-service"),  # a Nezha TrainTicket pod
        ("ts-basic-service-5dc8d4f9fd-46997", "ts-basic-service"),
        ("ts-consign-price-service-df498d7fb-725nt", "ts-consign-price-service"),  # a 9-character hash
        ("front_service", "front_service"),  # not a pod name: as it is
        ("ts-auth-service", "ts-auth-service"),
        ("", ""),
    ],
)
def test_a_pod_name_loses_its_replicaset_hash_and_pod_suffix(pod: str, deployment: str) -> None:
    assert _deployment(pod) == deployment
