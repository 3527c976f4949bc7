"""Federated learning of one task across clients that keep their texts (Flower).

- `local.py`: what a client computes on its own shard (no Flower): `ia3` scales and head
  trained from the global ones (FedProx's proximal term optional), the router's statistics of
  its texts, or `analytic`'s sufficient statistics.
- `merge.py`: what the server does with the replies (no Flower): refuses a reply of the wrong
  shapes or with a NaN/Inf, averages trained tensors weighted by examples, sums statistics, and
  adds the finished task to a model directory like any other task.
- `apps.py`: the Flower ServerApp, ClientApp and strategy over the two, for `flwr run`
  (SuperLink + SuperNodes) and for the simulation engine (`simulate`).
- `shards.py`: label-skewed shards of a task, to try it out.

Only `apps.py` imports Flower, and only when it is imported itself.
"""
