"""The data service: the batch plan, the coordinator, producer servers and trainer clients.

    plan.py         the batch plan: a pure function of (seed, epoch, selection, mixture history)
    selection.py    the samples a service plans over (cache + manifest thresholds)
    protocol.py     every RPC entry point and message
    rpc.py          TensorPipe RPC with fault-tolerant dynamic membership
    membership.py   the RPC group's member list: who may change it, and when (join, admission, leave)
    address.py      where a running service is: the address `mmdit serve` publishes in its run dir
    coordinator.py  leases, acks, the cursor, plan generations (run by `mmdit serve`)
    server.py       a producer: leases batches, prepares them from the cache, serves them
    client.py       a trainer's DP rank: prefetches its shards in plan order; the TP broadcast
    config.py       the `service.*` settings, split by role

Dependencies point one way: the client and the server import the protocol, never the
coordinator; only the coordinator's launcher (`mmdit serve`) imports the coordinator.
"""
