"""Training engine: a library (torch only) that the coordinator service and the bench scripts drive.

Nothing here imports redis, ray, grpc or generated stubs, so it runs on a GPU box with only torch.
"""
