"""``vqa webhooks``: signed delivery of completion events to the jobs' ``webhook_url`` (never from the GPU worker).

    post        one POST to a vetted, pinned address under a deadline and a response-size cap
    deliveries  the Redis side: pending deliveries, the due-time sorted set, the dead-letter stream
    dispatcher  the process: consumer group on the events stream, thread pool, retries
"""
