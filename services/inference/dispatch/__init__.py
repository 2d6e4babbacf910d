"""Pull-based request routing over Redis (docs/contracts.md "Redis keys").

`protocol`: the keys, stream entries and reply messages both sides speak. `puller`: the replica
side, which takes routed work only while it has room, so load balances itself and the request
stream's lag is the autoscaling signal. `failover`: the router side, which routes one request and
continues it on another replica when the one serving it stops heartbeating.
"""
