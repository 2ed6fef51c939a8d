"""Bottom layer: models, errors, settings and small asyncio helpers.

Nothing here imports grpc, redis or subprocess machinery; every other layer may import it.
"""
