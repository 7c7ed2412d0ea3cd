"""The HTTP job API (``vqa api``): the producer side over HTTP. It holds no model and imports no torch.

    app.py          create_app(settings): routers, auth, error handlers
    auth.py         bearer tokens (VQA_API_TOKENS), compared in constant time
    bodies.py       request bodies read under a size cap (413 while reading), JSON parsed to 400
    problems.py     RFC 9457 application/problem+json for every error
    idempotency.py  the Idempotency-Key header: same key + same body = same job; another body = 422
    jobs.py         /v1/jobs
    bulk.py         /v1/bulk (producer/bulk/)
    events.py       /v1/events/s3: bucket notifications into jobs (producer/ingest/)
    server.py       run_api: uvicorn
"""
