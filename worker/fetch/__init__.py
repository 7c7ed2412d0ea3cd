"""Safe outbound fetching of untrusted URLs: the SSRF guard, the pinned HTTP/S3 download, image decoding.

    netguard   parse a URL once, resolve once, refuse internal addresses (unless allowed)
    download   one http(s) or S3 transfer to a vetted address, under a deadline and a byte cap
    images     the fetch policy, ``fetch_image`` and the defensive decoder

Image fetching uses all three; webhook delivery reuses ``netguard`` and the pinned connection.
"""
