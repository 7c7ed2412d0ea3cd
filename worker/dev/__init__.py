"""Development and demo helpers, not part of a production worker's path.

    services     private redis-server, S3 API server, image server and worker processes
    demo         ``vqa demo`` (``make demo``)
    tiny_model   random-weight LLaVA-NeXT checkpoints for tests, demo and benchmarks
"""
