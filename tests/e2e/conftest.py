"""One real cluster per module: store + 2 workers (CLI subprocesses, tiny model, CPU) + router."""
from __future__ import annotations

import grpc
import pytest

from protos import inference_worker_pb2_grpc, router_pb2_grpc
from services.local_cluster import LocalCluster, LocalClusterConfig
from services.store_client import StoreClient

ADAPTERS = {"alpha": 1, "beta": 2, "hot": 3, "cold": 4}   # name -> seed


class E2E:
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address)
        return self._channels[address]

    @property
    def router(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(self.cluster.router_address))

    def worker(self, worker_id: str) -> inference_worker_pb2_grpc.InferenceWorkerStub:
        """worker-i listens on cluster.worker_addresses[i]."""
        address = self.cluster.worker_addresses[int(worker_id.rpartition("-")[2])]
        return inference_worker_pb2_grpc.InferenceWorkerStub(self.channel(address))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_model_dir, adapter_factory):
    config = LocalClusterConfig(data_dir=tmp_path_factory.mktemp("cluster"), model_dir=tiny_model_dir,
                                num_workers=2, router_port=0, store_port=0, worker_port=0)
    with LocalCluster(config) as cluster:
        with StoreClient(cluster.store_address) as store:
            for name, seed in ADAPTERS.items():
                store.upload(adapter_factory(tiny_model_dir, seed=seed), name)
        env = E2E(cluster)
        yield env
        env.close()
