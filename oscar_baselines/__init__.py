"""The paper's baselines, next to which OSCAR is reported (its Table I and communication figures).

* ``fedavg_server`` / ``fedavg_client``: FedAvg as a Flower app (``baselines/fedavg``): Flower's own
  ``FedAvg`` strategy training the same ResNet-18 over several rounds on the same clients and splits,
  with every message's size measured on the wire.
* ``centralized``: the ceiling, one ResNet-18 trained on the union of the clients' training data
  (``oscar-centralized``).
* ``compare``: OSCAR, FedAvg and Centralized side by side, accuracy per client and upload per client
  (``oscar-compare``).
"""
